"""A bounded load run against the Serve application on 127.0.0.1: latency, throughput, and whether
malformed requests ever hurt well-formed ones.

A fixed number of requests at a fixed concurrency, every `--bad-every`-th one malformed (bad JSON, an
unknown role, out-of-bound max_tokens, an oversize body, ...), every `--stream-every`-th good one
streamed. The run stops by itself: when every request is answered, or at `--time-limit` seconds
(requests not finished by then are counted as `unfinished`). Reports p50/p95 latency of the
well-formed requests, requests/s, completion tokens/s, and the failed well-formed requests (the goal is
0), as a table and in bench/results/serve_load.json.

Run against a server you started (`almost-ray serve`): `--url http://127.0.0.1:8000`; without `--url`
the script starts Serve itself on a free loopback port with `--model` (and stops it afterwards).
Smoke: `.venv/bin/python bench/serve_load.py --model tiny:llama --requests 12 --concurrency 3 --max-tokens 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from almost_ray.data.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
QUESTIONS = ["Name a color.", "What is the capital of France?", "Give me a tip for sleeping well.",
             "Say hello in Spanish.", "What is 2 + 2?", "Name a fruit that is yellow."]
# (body bytes, what makes it bad); each must be answered 4xx
BAD_BODIES = [
    (b'{"messages": [', "truncated JSON"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "wrong type"),
    (json.dumps({"messages": []}).encode(), "empty messages"),
    (b"[" * 50_000 + b"]" * 50_000, "deeply nested"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 400_000}]}).encode(), "oversize body"),
]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def plan(requests: int, bad_every: int, stream_every: int, max_tokens: int) -> list[dict]:
    """The fixed request list: which are bad, which are streamed, what each asks."""
    out, good = [], 0
    for i in range(requests):
        if bad_every and (i + 1) % bad_every == 0:
            body, why = BAD_BODIES[(i // bad_every) % len(BAD_BODIES)]
            out.append({"kind": "bad", "why": why, "content": body})
            continue
        stream = bool(stream_every) and (good + 1) % stream_every == 0
        body = {"messages": [{"role": "user", "content": QUESTIONS[good % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "seed": i, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        out.append({"kind": "good", "stream": stream, "content": json.dumps(body).encode()})
        good += 1
    return out


async def send(client: httpx.AsyncClient, url: str, item: dict) -> dict:
    start = time.perf_counter()
    rec = {"kind": item["kind"], "why": item.get("why"), "stream": item.get("stream", False)}
    headers = {"content-type": "application/json"}
    try:
        if item.get("stream"):
            tokens, done = 0, False
            async with client.stream("POST", url, content=item["content"], headers=headers) as r:
                rec["status"] = r.status_code
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            rec["ok"] = rec["status"] == 200 and done
            rec["tokens"] = tokens
        else:
            r = await client.post(url, content=item["content"], headers=headers)
            rec["status"] = r.status_code
            body = r.json()
            if item["kind"] == "good":
                rec["ok"] = r.status_code == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
                rec["tokens"] = body.get("usage", {}).get("completion_tokens", 0)
            else:  # a bad request must get a 4xx in OpenAI's error shape
                rec["ok"] = 400 <= r.status_code < 500 and "message" in body.get("error", {})
    except (httpx.HTTPError, ValueError, KeyError) as err:
        rec.update(status=None, ok=False, error=f"{type(err).__name__}: {err}")
    rec["latency_s"] = time.perf_counter() - start
    return rec


async def load(url: str, items: list[dict], concurrency: int, time_limit: float, timeout: float) -> tuple[list, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    records: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            records.append(await send(client, url, queue.get_nowait()))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:  # the time bound: stop whatever is still running
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records, time.perf_counter() - start


def summarize(records: list[dict], planned: list[dict], wall: float) -> dict:
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] == "bad"]
    latencies = [r["latency_s"] for r in good if r["ok"]]
    return {
        "requests_planned": len(planned),
        "requests_answered": len(records),
        "unfinished": len(planned) - len(records),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 3) if wall else None,
        "good_ok": sum(r["ok"] for r in good),
        "good_failed": sum(not r["ok"] for r in good),
        "bad_answered_4xx": sum(r["ok"] for r in bad),
        "bad_mishandled": sum(not r["ok"] for r in bad),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "completion_tokens_per_s": round(sum(r.get("tokens", 0) for r in good) / wall, 2) if wall else None,
        "failures": [r for r in records if not r["ok"]][:10],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(args: argparse.Namespace) -> str:
    import ray
    from ray import serve

    from almost_ray.serve.app import build_app

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_args = {"chat": {"model": args.model, "max_batch_size": args.concurrency, "deployment": {"num_cpus": 1}},
                  "reward": {"enabled": False},
                  "limits": {"max_tokens": max(args.max_tokens, 16), "default_max_tokens": min(args.max_tokens, 16)}}
    serve.run(build_app(serve_args), name="serve_load", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: start one here)")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="chat model when starting Serve here")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bad-every", type=int, default=4, help="every k-th request is malformed (0: none)")
    ap.add_argument("--stream-every", type=int, default=4, help="every k-th good request streams (0: none)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=600, help="stop after this many seconds in all")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--num-cpus", type=int, default=2, help="local Ray only")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        ap.error("--url must be a loopback address (this is a load generator)")

    started_here = args.url is None
    url = args.url or start_local(args)
    try:
        items = plan(args.requests, args.bad_every, args.stream_every, args.max_tokens)
        records, wall = asyncio.run(load(f"{url.rstrip('/')}/v1/chat/completions", items, args.concurrency,
                                         args.time_limit, args.timeout))
    finally:
        if started_here:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    summary = summarize(records, items, wall)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, **summary}
    write_json(args.output, result)
    rows = [("requests answered / planned", f"{summary['requests_answered']} / {summary['requests_planned']}"),
            ("wall s", summary["wall_s"]), ("requests/s", summary["requests_per_s"]),
            ("p50 latency s (well-formed)", summary["latency_p50_s"]),
            ("p95 latency s (well-formed)", summary["latency_p95_s"]),
            ("completion tokens/s", summary["completion_tokens_per_s"]),
            ("well-formed ok / FAILED", f"{summary['good_ok']} / {summary['good_failed']}"),
            ("malformed answered 4xx / mishandled", f"{summary['bad_answered_4xx']} / {summary['bad_mishandled']}"),
            ("unfinished at the time limit", summary["unfinished"])]
    for name, value in rows:
        print(f"{name:<38} {value if value is not None else '-':>12}" if not isinstance(value, float)
              else f"{name:<38} {value:>12.3f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
