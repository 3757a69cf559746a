"""`almost-ray compare`: synthetic comparisons, step 1 of ALMoST (Section 2.1).

queries -> the generator ladder (`synth.ladder`, one actor pool per model) -> `responses.jsonl`
-> binarize + Heuristic Filter (`synth.filters`) -> As-is RM filter (an RM-replica pool, only when
`as_is_rm` is configured) -> `comparisons.jsonl` in TRL's preference format (`prompt`, `chosen`,
`rejected`) with the rung names, ranks, query id and As-is scores. `manifest.json` counts every step
of the funnel and every drop with its reason; `funnel_rows` turns it into the `--report` table and
`funnel.png` plots it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from almost_ray.cluster.config import RayConfig
from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.dashboard import add_counts, run_of
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, reward_model
from almost_ray.config import Config
from almost_ray.data.atomic import atomic_open
from almost_ray.data.records import Comparison, RecordError, write_jsonl
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import load_queries, read_rows, require
from almost_ray.models.loading import check_model_ref
from almost_ray.models.reward import score_conversations
from almost_ray.runs import paths
from almost_ray.runs.manifest import read_manifest
from almost_ray.runs.stage import Outcome, Stage
from almost_ray.synth.config import CompareConfig
from almost_ray.synth.filters import Candidate, binarize, rm_agrees
from almost_ray.synth.ladder import generate_responses, remove_parts


def _as_is_scores(cfg: CompareConfig, ray_cfg: RayConfig, items: dict[str, list[dict]], out_dir: Path) -> dict:
    """As-is RM scores of the responses that appear in kept pairs: id -> reward (resumable shards)."""
    rm = cfg.as_is_rm
    rows = [{"id": k, "conversation": json.dumps(v)} for k, v in sorted(items.items())]
    key = hashlib.sha256(json.dumps([rm.ref, rm.dtype, rm.max_length]).encode()).hexdigest()[:12]
    shards = ShardedJsonl(out_dir / "parts" / f"as_is_scores.{key}.jsonl", cfg.shard_size)
    if shards.final.exists():  # scored by an earlier, interrupted run of this stage
        return {r["id"]: r["reward"] for r in read_rows(shards.final)}
    todo = shards.pending(rows)
    if todo:
        init_ray(ray_cfg)
        kwargs = dict(answer=score_conversations, model=reward_model(rm.ref, rm.dtype, rm.max_length,
                                                                     rm.resources.batch_size))
        shards.collect(
            {"id": r["id"], "reward": float(r["reward"]), "_shard": r["_shard"], "_row": r["_row"]}
            for r in stream_pool(todo, ModelReplica, kwargs, rm.resources, "compare.as_is_rm.resources")
        )
    shards.finalize()  # the merged file stays in parts/ until the stage is done
    return {r["id"]: r["reward"] for r in read_rows(shards.final)}


def build_comparisons(
    cfg: CompareConfig, responses: list[dict]
) -> tuple[list[dict], dict]:
    """Binarize and Heuristic-filter each query's responses; returns comparison dicts and the counts."""
    by_query: dict[str, list[dict]] = defaultdict(list)
    for r in responses:
        by_query[r["query_id"]].append(r)
    rungs = [r.name for r in cfg.ladder]
    k = len(rungs)
    dropped_responses: Counter = Counter()
    dropped_pairs: Counter = Counter()
    comparisons = []
    for qid, rows in by_query.items():
        cands = [Candidate(rank=r["rank"], rung=r["generator"], text=r["responses"][0]) for r in rows]
        result = binarize(cands, cfg.heuristic_filter, cfg.pairing)
        dropped_responses.update(result.dropped_responses)
        dropped_pairs.update(result.dropped_pairs)
        for chosen, rejected in result.pairs:
            comparisons.append({
                "prompt": rows[0]["prompt"], "chosen": chosen.text.strip(), "rejected": rejected.text.strip(),
                "query_id": qid, "chosen_rung": chosen.rung, "rejected_rung": rejected.rung,
                "chosen_rank": chosen.rank, "rejected_rank": rejected.rank,
                "length_threshold": None if result.threshold is None else round(result.threshold, 1),
            })
    per_rung_dropped: dict[str, dict[str, int]] = {r: {} for r in rungs}
    for key, n in sorted(dropped_responses.items()):
        rung, reason = key.split("/", 1)
        per_rung_dropped[rung][reason] = n
    n_queries = len(by_query)
    counts = {
        "queries": n_queries,
        "responses": {r: n_queries for r in rungs},
        "responses_dropped": per_rung_dropped,
        "responses_kept": {r: n_queries - sum(per_rung_dropped[r].values()) for r in rungs},
        "pairs_possible": n_queries * k * (k - 1) // 2,
        "pairs_dropped": dict(dropped_pairs),
        "pairs_after_heuristic_filter": len(comparisons),
    }
    return comparisons, counts


def load_compare_queries(cfg: Config) -> list:
    """The queries the ladder answers (`compare.queries`, else the queries stage's), at most `max_queries`."""
    return load_queries(paths.compare_queries(cfg))[: cfg.compare.max_queries]


def check(cfg: Config) -> None:
    """Every query row, every rung's generator and the As-is RM, before Ray starts or a model loads."""
    require(paths.compare_queries(cfg), "compare.queries", None if cfg.compare.queries else "queries")
    load_compare_queries(cfg)
    for i, rung in enumerate(cfg.compare.ladder):
        check_model_ref(rung.model.ref, f"compare.ladder.{i}.model.ref")
    if cfg.compare.as_is_rm is not None:
        check_model_ref(cfg.compare.as_is_rm.ref, "compare.as_is_rm.ref", "reward_model")


def work(cfg: Config) -> Outcome:
    """Write `{responses,comparisons}.jsonl`, the funnel's metrics and `funnel.png`."""
    c_cfg, ray_cfg = cfg.compare, cfg.ray
    out_dir = paths.stage_dir(cfg, "compare")
    queries = load_compare_queries(cfg)
    responses_path, pool_metrics = generate_responses(c_cfg, ray_cfg, queries, out_dir)
    responses = list(read_rows(responses_path))
    comparisons, counts = build_comparisons(c_cfg, responses)

    as_is = {"configured": c_cfg.as_is_rm is not None}
    if c_cfg.as_is_rm is not None and comparisons:
        t0 = time.time()
        items = {}
        for c in comparisons:
            for side in ("chosen", "rejected"):
                items[f"{c['query_id']}|{c[side + '_rung']}"] = [
                    {"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c[side]}]
        scores = _as_is_scores(c_cfg, ray_cfg, items, out_dir)
        kept = []
        for c in comparisons:
            c["chosen_score"] = scores[f"{c['query_id']}|{c['chosen_rung']}"]
            c["rejected_score"] = scores[f"{c['query_id']}|{c['rejected_rung']}"]
            if rm_agrees(c["chosen_score"], c["rejected_score"]):
                kept.append(c)
        counts["pairs_dropped"]["as_is_rm"] = len(comparisons) - len(kept)
        comparisons = kept
        as_is.update(responses_scored=len(items), seconds=round(time.time() - t0, 2))
    counts["comparisons"] = write_jsonl(paths.comparisons_file(cfg), (Comparison(**c) for c in comparisons))
    counts["comparisons_by_rungs"] = dict(Counter(f"{c['chosen_rung']}>{c['rejected_rung']}" for c in comparisons))

    publish_funnel(run_of(out_dir), counts)
    with atomic_open(out_dir / "metrics.jsonl") as f:
        for pool, m in pool_metrics.items():
            f.write(json.dumps({"step": "generate", "pool": pool, **m}) + "\n")
        if as_is.get("seconds") is not None:
            f.write(json.dumps({"step": "as_is_rm", **as_is}) + "\n")
    plot_funnel(out_dir, counts)
    remove_parts(out_dir)
    return Outcome(counts=counts, metrics={"pools": pool_metrics, "as_is_rm": as_is})


STAGE = Stage(
    "compare", "the generator ladder, Heuristic Filter and As-is RM filter -> synthetic comparisons",
    section=lambda c: c.compare,
    inputs=lambda c: {"queries": paths.compare_queries(c)},
    outputs=lambda c: {"comparisons": paths.comparisons_file(c)},
    work=work, check=check,
    headline=("counts.queries", "counts.pairs_possible", "counts.pairs_after_heuristic_filter", "counts.comparisons"),
)


def run(cfg: Config) -> Path:
    """Synthetic comparisons into `<run dir>/compare/comparisons.jsonl`; skipped when up to date."""
    return STAGE.run(cfg)


def publish_funnel(run: str, counts: dict) -> None:
    """Comparisons kept after each filter, as dashboard counters (`docs/monitoring.md`)."""
    add_counts(run, "compare", {
        "responses": sum(counts["responses"].values()), "responses_kept": sum(counts["responses_kept"].values()),
        "pairs_possible": counts["pairs_possible"], "pairs_after_heuristic_filter": counts["pairs_after_heuristic_filter"],
        "comparisons": counts["comparisons"],
        **{f"pairs_dropped_{k}": v for k, v in counts["pairs_dropped"].items()},
    })


def funnel_rows(manifest: dict) -> list[tuple[str, str]]:
    """The funnel of a finished `compare` stage as (step, count) rows, every drop with its reason."""
    c = manifest["counts"]
    rows = [("queries", str(c["queries"]))]
    for rung, n in c["responses"].items():
        drops = c["responses_dropped"].get(rung, {})
        why = ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]))
        rows.append((f"responses {rung}", f"{n} -> kept {c['responses_kept'][rung]}" + (f" (dropped: {why})" if why else "")))
    rows.append(("pairs (every two rungs)", str(c["pairs_possible"])))
    labels = {"response_filtered": "a response dropped by the Heuristic Filter",
              "length_rule": "length rule (chosen shorter than rejected and M - S/2)",
              "one_per_chosen": "pairing one_per_chosen", "as_is_rm": "As-is RM prefers the rejected"}
    for key in ("response_filtered", "length_rule", "one_per_chosen"):
        if c["pairs_dropped"].get(key):
            rows.append((f"  - {labels[key]}", str(c["pairs_dropped"][key])))
    rows.append(("after the Heuristic Filter", str(c["pairs_after_heuristic_filter"])))
    if "as_is_rm" in c["pairs_dropped"]:
        rows.append((f"  - {labels['as_is_rm']}", str(c["pairs_dropped"]["as_is_rm"])))
    else:
        rows.append(("  - As-is RM filter", "skipped (compare.as_is_rm not set)"))
    rows.append(("comparisons", str(c["comparisons"])))
    for pair, n in sorted(c.get("comparisons_by_rungs", {}).items()):
        rows.append((f"  {pair}", str(n)))
    return rows


def format_funnel(out_dir: str | Path) -> str:
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise RecordError(f"{out_dir}: no manifest.json (the compare stage has not finished)")
    rows = funnel_rows(manifest)
    width = max(len(s) for s, _ in rows)
    lines = [f"{'step':<{width}}  count", f"{'-' * width}  -----"]
    lines += [f"{s:<{width}}  {n}" for s, n in rows]
    lines.append(f"(wall time {manifest['wall_time_s']:.0f} s)")
    return "\n".join(lines)


def plot_funnel(out_dir: str | Path, c: dict) -> Path:
    """`funnel.png`: responses kept per rung and pairs at each filter step (`c`: the stage's counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    rungs = list(c["responses"])
    ax1.barh(rungs, [c["responses"][r] for r in rungs], color="#ccc", label="generated")
    ax1.barh(rungs, [c["responses_kept"][r] for r in rungs], color="#3a7", label="kept")
    ax1.invert_yaxis()
    ax1.set_title("responses per rung (best first)")
    ax1.legend(loc="lower right")
    steps = [("possible pairs", c["pairs_possible"]),
             ("after Heuristic Filter", c["pairs_after_heuristic_filter"]),
             ("comparisons", c["comparisons"])]
    ax2.barh([s for s, _ in steps], [n for _, n in steps], color=["#ccc", "#7ac", "#36a"])
    ax2.invert_yaxis()
    for i, (_, n) in enumerate(steps):
        ax2.text(n, i, f" {n}", va="center")
    ax2.set_title("comparison funnel")
    fig.tight_layout()
    path = out_dir / "funnel.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
