"""`almost-ray queries`: Self-Instruct query mining on Ray Data (ALMoST Appendix C.1).

Each round builds `prompts_per_round` prompts: the instruction, then `static_shots` seed queries and
`dynamic_shots` queries mined in earlier rounds (seeds fill in while too few are mined), each on a
`Query: ...` line, ending with `Query:`. The prompts go through generation replicas loaded once for
all rounds (`replicas.ReplicaSet`); the
completions come back, are put in prompt order, parsed into queries, filtered (banned words, length,
final punctuation) and deduplicated against the seeds and every query kept so far with Rouge-L
(`rouge-score`, keep only when the max F < threshold, strictly, as Self-Instruct's "less than"). Shot
choice uses `random.Random(f"{seed}/{round}")`, sampling is seeded per prompt and the dedup runs on the
driver in a fixed order, so the mined queries depend on the seed only, never on the number of replicas
or the order results arrive in.

Each round's completions are saved in resumable shards under `queries/rounds/`; a re-run replays the
saved rounds (nothing is regenerated) and continues where the run stopped.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from rouge_score import rouge_scorer, tokenizers

from almost_ray.cluster.config import RayConfig
from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.dashboard import add_counts, progress, run_of
from almost_ray.cluster.replicas import ModelReplica, ReplicaSet
from almost_ray.config import Config
from almost_ray.config_base import config_hash
from almost_ray.data.atomic import atomic_open, own_directory, remove_own_directory, write_json
from almost_ray.data.records import Query, RecordError, write_jsonl
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import iter_rows, read_rows, require
from almost_ray.generate.pool import generation_replica
from almost_ray.models.loading import check_model_ref
from almost_ray.prompts.templates import packaged_text
from almost_ray.runs import paths
from almost_ray.runs.manifest import read_manifest
from almost_ray.runs.stage import Outcome, Stage
from almost_ray.synth.config import QueriesConfig

INSTRUCTION_LINE = "### Instruction:"


# ---- pure pieces -------------------------------------------------------------------------------


def split_instruction(lines: list[str], source: str = "<seeds>") -> tuple[str | None, list[str]]:
    """Seed queries, and the instruction when the first line is `### Instruction: ...` (as in ALMoST's
    seed_prompts.txt)."""
    lines = [line.strip() for line in lines if line.strip()]
    instruction = None
    if lines and lines[0].startswith(INSTRUCTION_LINE):
        instruction = lines.pop(0)[len(INSTRUCTION_LINE):].strip()
    if not lines:
        raise RecordError(f"{source}: no rows (no seed queries)")
    return instruction, lines


def load_seeds(spec: str | None) -> tuple[str | None, list[str]]:
    """The seeds of `queries.seeds` from any source: a .txt (one query per line), or rows with `text`
    (JSONL, Parquet, a saved dataset, a hub id); null: the project's own `prompts/seed_queries.txt`."""
    if spec is None:
        return split_instruction(packaged_text("seed_queries.txt").splitlines(), "seed_queries.txt")
    texts = []
    for number, row in iter_rows(spec):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{spec}:{number}: text: expected a non-empty string (a seed query)")
        texts.append(text)
    return split_instruction(texts, str(spec))


def draw_shots(
    rng: random.Random, seeds: list[str], mined: list[str], static: int, dynamic: int
) -> list[str]:
    """`static` seeds and `dynamic` mined queries, shuffled; seeds stand in while few are mined."""
    dyn = rng.sample(mined, min(dynamic, len(mined)))
    shots = rng.sample(seeds, min(static + dynamic - len(dyn), len(seeds))) + dyn
    rng.shuffle(shots)
    return shots


def build_prompt(instruction: str, shots: list[str], prefix: str = "Query:") -> str:
    """The Self-Instruct prompt of the released ALMoST code: instruction, shots, an open `Query:` line."""
    body = "".join(f"{prefix} {s}\n" for s in shots)
    return f"{instruction}\n\n{body}{prefix}"


def parse_queries(completion: str, prefix: str = "Query:") -> list[str]:
    """The queries a completion of `build_prompt` wrote.

    The first line continues the open `Query:`; each following line that starts with the prefix is
    another query. Parsing stops at the first line that is neither (the model has drifted); an inline
    second `Query:` on one line is cut off, as in the released code.
    """
    found = []
    split = re.compile(rf"\s*{re.escape(prefix.rstrip(':'))}\s?:", flags=re.IGNORECASE)
    for i, line in enumerate(completion.split("\n")):
        line = line.strip()
        if i > 0:
            if not line.lower().startswith(prefix.lower()):
                break
            line = line[len(prefix):]
        text = split.split(line)[0].strip()
        if text:
            found.append(text)
    return found


def query_issue(text: str, cfg: QueriesConfig) -> str | None:
    """Why a mined query is dropped before dedup, or None: banned words, length, final punctuation."""
    lowered = text.lower()
    for word in cfg.banned_words:
        if re.search(rf"\b{re.escape(word.lower())}s?\b", lowered):
            return "banned_word"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if cfg.end_chars and text[-1] not in cfg.end_chars:
        return "unfinished"
    return None


class _CachedTokenizer(tokenizers.Tokenizer):
    """rouge-score's default tokenizer, memoised: each kept query is tokenized once, not once per check."""

    def __init__(self):
        self.inner = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        if text not in self.cache:
            self.cache[text] = self.inner.tokenize(text)
        return self.cache[text]


class RougeDedup:
    """Keeps a text only when its Rouge-L F against every text kept before is < `threshold`.

    Strict: Self-Instruct (Wang et al., 2022) adds an instruction "only when its ROUGE-L similarity with any
    existing instruction is less than" the threshold, and ALMoST (Appendix C.1) follows it with 0.5.

    Order-stable: the result depends only on the order texts are offered. A bag-of-words bound
    (the LCS is at most the multiset overlap) skips the exact LCS of pairs that cannot exceed the
    threshold, so the check is a cheap linear scan until a near-duplicate shows up.
    """

    def __init__(self, threshold: float = 0.5, initial: list[str] | None = None):
        self.threshold = threshold
        self.tokenizer = _CachedTokenizer()
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self.tokenizer)
        self.kept: list[tuple[str, Counter]] = []
        for text in initial or []:
            self._keep(text)

    def _keep(self, text: str) -> None:
        self.kept.append((text, Counter(self.tokenizer.tokenize(text))))

    def max_score(self, text: str) -> float:
        """The max Rouge-L F against the kept texts when it reaches the threshold; else a lower bound."""
        bag = Counter(self.tokenizer.tokenize(text))
        n = sum(bag.values())
        best = 0.0
        for other, other_bag in self.kept:
            m = sum(other_bag.values())
            if n + m == 0:
                continue
            if 2 * sum((bag & other_bag).values()) / (n + m) < self.threshold:
                continue  # the bound is below the threshold: so is the F
            best = max(best, self.scorer.score(other, text)["rougeL"].fmeasure)
            if best >= self.threshold:
                break
        return best

    def offer(self, text: str) -> tuple[bool, float]:
        """(kept?, the Rouge-L F that decided: at or above the threshold means a near-duplicate)."""
        score = self.max_score(text)
        if score < self.threshold:
            self._keep(text)
            return True, score
        return False, score


# ---- the stage ---------------------------------------------------------------------------------


def _replay_key(cfg: QueriesConfig, instruction: str, seeds: list[str]) -> str:
    """What determines each round's completions; `target`, `max_rounds` and resources are left out,
    so raising the target or changing the pool size reuses the rounds already mined."""
    section = cfg.model_copy(update={"target": 0, "max_rounds": 1, "resources": type(cfg.resources)()})
    return json.dumps([config_hash(section), instruction, seeds])


def _generate_round(cfg: QueriesConfig, ray_cfg: RayConfig, prompts: list[str], path: Path,
                    replicas: ReplicaSet) -> list[str]:
    """Completions of one round's prompts, in prompt order, through resumable shards."""
    if not path.exists():
        shards = ShardedJsonl(path, cfg.shard_size)
        rows = [{"id": f"p{i:06d}", "messages": json.dumps([{"role": "user", "content": p}])}
                for i, p in enumerate(prompts)]
        todo = shards.pending(rows)
        if todo:
            init_ray(ray_cfg)
            shards.collect(
                {"id": r["id"], "completion": json.loads(r["responses"])[0], "_shard": r["_shard"], "_row": r["_row"]}
                for r in replicas.map(todo)
            )
        shards.finalize()
    return [row["completion"] for row in read_rows(path)]


def generation_replicas(cfg: QueriesConfig, run: str) -> ReplicaSet:
    """The generator's replicas for every round: started at the first round that generates, kept
    loaded across rounds (a Ray Data pool per round would load the model again each round)."""
    kwargs = generation_replica(cfg.model, cfg.sampling, "raw", metrics_tags=(run, "queries"))
    return ReplicaSet(ModelReplica, kwargs, cfg.resources, "queries.resources")


def check(cfg: Config) -> None:
    """Seeds readable and not empty, the generator a causal LM: before Ray starts or a model loads."""
    q = cfg.queries
    if q.seeds is not None:
        require(q.seeds, "queries.seeds")
    load_seeds(q.seeds)
    check_model_ref(q.model.ref, "queries.model.ref")


def work(cfg: Config) -> Outcome:
    """Mine `queries.target` queries into `queries.jsonl`, round by round (replaying saved rounds)."""
    q = cfg.queries
    out_dir = paths.stage_dir(cfg, "queries")
    file_instruction, seeds = load_seeds(q.seeds)
    instruction = file_instruction or q.instruction

    rounds_dir = out_dir / "rounds"
    key_file = rounds_dir / "replay_key.json"
    key = _replay_key(q, instruction, seeds)
    if rounds_dir.exists() and (not key_file.exists() or json.loads(key_file.read_text()) != key):
        remove_own_directory(rounds_dir)  # rounds mined with other settings cannot be replayed
    own_directory(rounds_dir)
    write_json(key_file, key)

    dedup = RougeDedup(q.rouge_threshold, initial=seeds)
    mined: list[Query] = []
    counts: Counter = Counter()
    run = run_of(out_dir)
    with atomic_open(out_dir / "metrics.jsonl") as metrics, generation_replicas(q, run) as replicas:
        for rnd in range(q.max_rounds):
            if len(mined) >= q.target:
                break
            t0 = time.time()
            rng = random.Random(f"{q.seed}/{rnd}")
            texts = [m.text for m in mined]
            prompts = [
                build_prompt(instruction, draw_shots(rng, seeds, texts, q.static_shots, q.dynamic_shots), q.prefix)
                for _ in range(q.prompts_per_round)
            ]
            path = rounds_dir / f"round-{rnd:04d}.jsonl"
            replayed = path.exists()
            completions = _generate_round(q, cfg.ray, prompts, path, replicas)
            before, seen = len(mined), Counter(counts)
            for completion in completions:
                for text in parse_queries(completion, q.prefix):
                    counts["parsed"] += 1
                    issue = query_issue(text, q)
                    if issue is None:
                        keep, _ = dedup.offer(text)
                        issue = None if keep else "rouge_overlap"
                    if issue is not None:
                        counts[f"dropped_{issue}"] += 1
                        continue
                    mined.append(Query(id=f"q{len(mined):06d}", text=text, source="mined", round=rnd))
            counts["completions"] += len(completions)
            counts["rounds"] += 1
            round_counts = {k: counts[k] - seen[k] for k in counts if k.startswith("dropped_") or k == "parsed"}
            metrics.write(json.dumps({
                "round": rnd, "completions": len(completions), "new_queries": len(mined) - before,
                "total_queries": len(mined), "replayed": replayed, "seconds": round(time.time() - t0, 2),
                **round_counts,
            }) + "\n")
            metrics.flush()
            add_counts(run, "queries", {"mined": len(mined) - before, **round_counts})
            progress(run, "queries", min(len(mined), q.target), q.target)
            print(f"queries: round {rnd}: +{len(mined) - before} -> {len(mined)}/{q.target}", flush=True)
    kept = mined[: q.target]
    if len(kept) < q.target:
        print(f"queries: warning: only {len(kept)} of {q.target} queries after {q.max_rounds} rounds")
    write_jsonl(paths.queries_file(cfg), kept)
    counts.update({"seeds": len(seeds), "kept": len(kept), "target": q.target,
                   "surplus_dropped": len(mined) - len(kept)})
    plot_rounds(out_dir)
    return Outcome(counts=dict(counts), metrics={"target_reached": len(kept) >= q.target})


STAGE = Stage(
    "queries", "Self-Instruct query mining (ALMoST step 1, Appendix C.1)",
    section=lambda c: c.queries,
    inputs=lambda c: {"seeds": c.queries.seeds} if c.queries.seeds is not None else {},
    outputs=lambda c: {"queries": paths.queries_file(c)},
    work=work, check=check,
    headline=("counts.kept", "counts.parsed", "counts.rounds", "counts.dropped_*"),
)


def run(cfg: Config) -> Path:
    """Mine queries into `<run dir>/queries/queries.jsonl`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)


def plot_rounds(out_dir: str | Path) -> Path:
    """`mining.png`: queries kept and dropped (by reason) per round, from `metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(read_rows(Path(out_dir) / "metrics.jsonl"))
    reasons = sorted({k for r in rows for k in r if k.startswith("dropped_")})
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(rows)
    for key, color in [("new_queries", "#3a7"), *zip(reasons, ["#c66", "#e94", "#aa5", "#888", "#96c"])]:
        vals = [r.get(key, 0) for r in rows]
        ax.bar(x, vals, bottom=bottom, color=color, label=key.replace("dropped_", "dropped: "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("round")
    ax.set_ylabel("parsed queries")
    ax.set_title("query mining: kept and dropped per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "mining.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def funnel(out_dir: str | Path) -> list[tuple[str, int | str]]:
    """The mining funnel from a finished stage's manifest, for `almost-ray queries` to print."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise RecordError(f"{out_dir}: no manifest.json (the queries stage has not finished)")
    c = manifest["counts"]
    rows: list[tuple[str, int | str]] = [("completions", c.get("completions", 0)),
                                         ("queries parsed", c.get("parsed", 0))]
    rows += [(f"  dropped: {k[len('dropped_'):]}", v) for k, v in sorted(c.items()) if k.startswith("dropped_")]
    rows += [("  beyond target", c.get("surplus_dropped", 0)), ("queries kept", c.get("kept", 0))]
    return rows
