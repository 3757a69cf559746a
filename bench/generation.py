"""Generation throughput on the embedded model: where does batching and Ray Data put us?

Same prompts, same sampling (top-p 0.9, T 1.0, 64 new tokens), four ways:
  (a) naive: one `model.generate` call per prompt;
  (b) our HF backend, batched with left padding, and where its time goes: prefill, the decode steps'
      forward passes, and the rest of each step (sampling, logits processing, the loop), from hooks;
  (c) the Ray Data actor pool, 2 replicas x 1 CPU: wall time with actor start and model load, and after
      them (the same pool on 2 prompts and 1 new token, timed alone, is the start-up taken off);
  (d) the limit: batched teacher-forced forward passes over the same token count (no decode loop).
Then a few-shot stage, the demo's `hhh-3shot` ladder rung (every prompt starts with the same few-shot
header), through our HF backend (e) with plain left padding and (f) with the shared-prefix KV cache; the
two must give the same text. Prints a table with ratios and writes JSON to bench/results/generation.json
(with the load average at the end: a busy machine's row is not comparable).
Run: `make bench` or `.venv/bin/python bench/generation.py [--prompts 32 --max-new-tokens 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.generate.pool import stream_generation
from almost_ray.models import hf_backend
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.hf_backend import HFGenerator, PrefixCache
from almost_ray.prompts.templates import fewshot_header, human_assistant, load_prompt_text, packaged_text

REF = "embedded:smollm2-135m-instruct"


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)


def naive(gen: HFGenerator, prompts: list[str], params: SamplingParams) -> tuple[float, list[str]]:
    tok, model = gen.tokenizer, gen.model
    outs = []
    start = time.perf_counter()
    torch.manual_seed(params.seed)
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(
                **enc, do_sample=True, top_p=params.top_p, temperature=params.temperature,
                max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id,
            )
        outs.append(tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return time.perf_counter() - start, outs


def batched(gen: HFGenerator, prompts: list[str], params: SamplingParams) -> tuple[float, list[str]]:
    start = time.perf_counter()
    outs = gen.generate(prompts, params)
    return time.perf_counter() - start, [o[0] for o in outs]


def batched_split(gen: HFGenerator, prompts: list[str], params: SamplingParams) -> tuple[float, list[str], dict]:
    """`batched`, and where its time went: prefill, the decode steps' forward passes, and everything else
    per decode step (sampling, logits processing, the loop around the model), from hooks on the forward."""
    calls: list[tuple[int, float]] = []  # (tokens fed per row: the prompt, or 1 in a decode step; seconds)
    started = [0.0]
    hooks = [gen.model.register_forward_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter())),
             gen.model.register_forward_hook(
                 lambda _m, _a, kw, _o: calls.append((kw["input_ids"].shape[1], time.perf_counter() - started[0])),
                 with_kwargs=True)]
    try:
        wall, outs = batched(gen, prompts, params)
    finally:
        for hook in hooks:
            hook.remove()
    return wall, outs, decode_split(calls, wall)


def decode_split(calls: list[tuple[int, float]], wall: float) -> dict:
    prefill = sum(s for width, s in calls if width > 1)
    decode = [s for width, s in calls if width == 1]
    rest = wall - prefill - sum(decode)
    return {"prefill_s": round(prefill, 3), "decode_steps": len(decode),
            "forward_ms_per_step": round(sum(decode) / len(decode) * 1e3, 1),
            "rest_ms_per_step": round(rest / len(decode) * 1e3, 1)}


def ray_pool(queries: list[str], params: SamplingParams, batch_size: int) -> tuple[float, list[str], float]:
    """Wall time and texts of the pool's run, and its start-up: the same pool (Ray Data executor, 2 actors,
    model load in each) on 2 one-token prompts, one per replica."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    resources = ResourcesConfig(concurrency=2, num_cpus=1, batch_size=batch_size)
    model = ModelConfig(ref=REF, dtype="float32", max_batch_size=batch_size)

    def run(qs: list[str], p: SamplingParams, res: ResourcesConfig) -> tuple[float, list[dict]]:
        rows = [{"id": str(i), "messages": json.dumps([{"role": "user", "content": q}])} for i, q in enumerate(qs)]
        start = time.perf_counter()
        out = list(stream_generation(rows, model, p, res, "chat"))
        return time.perf_counter() - start, out

    startup, _ = run(queries[:2], params.model_copy(update={"max_new_tokens": 1}),
                     resources.model_copy(update={"batch_size": 1}))
    wall, out = run(queries, params, resources)
    ray.shutdown()
    return wall, [r["responses"][0] for r in out], startup


def forward_limit(gen: HFGenerator, prompts: list[str], outs: list[str], batch_size: int) -> tuple[float, int]:
    """Teacher-forced forward passes over prompt+output: the time decode would take if every generated
    token cost what it costs in a prefill. Counts the generated tokens only, as (a)-(c) do."""
    texts = [p + o for p, o in zip(prompts, outs, strict=True)]
    tok = gen.tokenizer
    tok.padding_side = "right"
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen.model(**enc)
    tok.padding_side = "left"
    return time.perf_counter() - start, count_tokens(tok, outs)


def fewshot(gen: HFGenerator, queries: list[str], params: SamplingParams, shots: int, share: bool):
    """A ladder rung's prompts (ALMoST's HHH prompt, `shots` demonstrations) with or without the prefix cache;
    returns (wall, outputs, prompt tokens per prompt)."""
    header = fewshot_header(load_prompt_text("hhh"), shots)
    prompts = [human_assistant([{"role": "user", "content": q}], header) for q in queries]
    saved = hf_backend.PREFIX_MIN_TOKENS
    hf_backend.PREFIX_MIN_TOKENS = saved if share else 10**9
    gen.prefix_cache = PrefixCache()
    try:
        wall, outs = batched(gen, prompts, params)
    finally:
        hf_backend.PREFIX_MIN_TOKENS = saved
    return wall, outs, count_tokens(gen.tokenizer, prompts) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=ModelConfig.model_fields["max_batch_size"].default,
                    help="rows per forward pass of (b) and (d); the pool's replicas take half each "
                         "(default: the HF backend's own, models.config.ModelConfig)")
    ap.add_argument("--shots", type=int, default=3, help="demonstrations in the few-shot rung of (e) and (f)")
    ap.add_argument("--out", default="bench/results/generation.json")
    args = ap.parse_args()

    queries = [q for q in packaged_text("seed_queries.txt").splitlines() if q.strip()]
    queries = (queries * (args.prompts // len(queries) + 1))[: args.prompts]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens, seed=0)
    gen = HFGenerator(ModelConfig(ref=REF, dtype="float32", max_batch_size=args.batch_size), device="cpu")
    prompts = [gen.chat_prompt([{"role": "user", "content": q}]) for q in queries]

    rows = {}
    wall, outs = naive(gen, prompts, params)
    rows["(a) naive, one prompt at a time"] = (wall, count_tokens(gen.tokenizer, outs))
    wall, outs, split = batched_split(gen, prompts, params)
    rows[f"(b) HF backend, batch {args.batch_size}"] = (wall, count_tokens(gen.tokenizer, outs))
    print(f"(b) where the time went: {split}")
    wall, pool_outs, startup = ray_pool(queries, params, batch_size=args.batch_size // 2)
    pool_tokens = count_tokens(gen.tokenizer, pool_outs)
    rows["(c) Ray Data pool, 2 x 1 CPU (incl. load)"] = (wall, pool_tokens)
    rows[f"(c') the same after start-up ({startup:.1f} s)"] = (wall - startup, pool_tokens)
    wall, tokens = forward_limit(gen, prompts, outs, args.batch_size)
    rows["(d) limit: batched forward passes"] = (wall, tokens)

    stage_params = params.model_copy(update={"stop": ["\n\nHuman:"]})
    wall, plain_outs, prompt_tokens = fewshot(gen, queries, stage_params, args.shots, share=False)
    rows[f"(e) few-shot rung ({args.shots} shots), plain"] = (wall, count_tokens(gen.tokenizer, plain_outs))
    wall, shared_outs, _ = fewshot(gen, queries, stage_params, args.shots, share=True)
    rows[f"(f) few-shot rung ({args.shots} shots), shared prefix"] = (wall, count_tokens(gen.tokenizer, shared_outs))
    same_text = plain_outs == shared_outs
    print(f"few-shot prompts: {prompt_tokens:.0f} tokens each; shared-prefix output identical to plain: {same_text}")

    base = rows["(a) naive, one prompt at a time"]
    base_tps = base[1] / base[0]
    single = rows[f"(b) HF backend, batch {args.batch_size}"]
    single_tps = single[1] / single[0]
    print(f"{'method':<44} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7}")
    results = []
    for name, (wall, tokens) in rows.items():
        tps = tokens / wall
        print(f"{name:<44} {tokens:>7} {wall:>8.1f} {tps:>8.1f} {tps / base_tps:>6.2f}x {tps / single_tps:>6.2f}x")
        results.append({"method": name, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tps, 2),
                        "ratio_vs_naive": round(tps / base_tps, 3), "ratio_vs_batched": round(tps / single_tps, 3)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": REF, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "fewshot_prompt_tokens": round(prompt_tokens, 1), "shared_prefix_output_identical": same_text,
        "batched_split": split, "load_average": os.getloadavg(),
        "results": results,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
