"""Log-likelihood scoring of evaluation items, in process or sharded over a Ray Data actor pool.

Every suite turns its items into rows `{"key", "context", "continuations": [...]}` and gets back, per
key, `logprobs` (log p(continuation | context), summed over its tokens) and `lengths` (its token
counts). `score_batch` is what a pool's replica (`cluster.replicas.ModelReplica`, one generator per actor)
does with a batch; `score_on_ray` streams rows through a pool of them, writing
resumable shards, and `score_in_process` does the same work with a generator in hand (tests, notebooks).

With an HF generator (`HFGenerator.shared_context_logprobs`) a row's context is computed once for all
its continuations (its key/value cache is shared by them), and the vocabulary projection runs only where a continuation token is predicted.
The numbers are those of `loglikelihood` (tested), at a fraction of the cost: answer letters and
true/false need one position of logits per prompt, and TruthfulQA's ~5 choices share one question.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, generator_model, reward_model
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import read_rows
from almost_ray.models.config import ModelConfig
from almost_ray.models.generator import Generator
from almost_ray.models.reward import score_conversations
from almost_ray.models.text import encode_pair

Row = dict
Scores = dict[str, dict]
Scorer = Callable[[list[Row], str], Scores]  # (rows, name of the job) -> key -> {"logprobs", "lengths"}


def score_rows(generator: Generator, rows: list[Row]) -> list[dict]:
    """`{"logprobs": [...], "lengths": [...]}` for each row, in order."""
    tokenizer = generator.tokenizer
    encoded = [[encode_pair(tokenizer, r["context"], c) for c in r["continuations"]] for r in rows]
    results: list[dict | None] = [None] * len(rows)
    if hasattr(generator, "shared_context_logprobs"):  # the HF backend: one pass per context
        shared = [i for i, pairs in enumerate(encoded)
                  if len(pairs[0][0]) + max(len(c) for _, c in pairs) <= generator.max_positions]
        shared.sort(key=lambda i: len(encoded[i][0][0]))
        step = generator.config.max_batch_size
        for start in range(0, len(shared), step):
            idx = shared[start : start + step]
            lps = generator.shared_context_logprobs(
                [encoded[i][0][0] for i in idx], [[c for _, c in encoded[i]] for i in idx]
            )
            for i, lp in zip(idx, lps):
                results[i] = {"logprobs": lp, "lengths": [len(c) for _, c in encoded[i]]}
    rest = [i for i in range(len(rows)) if results[i] is None]
    contexts = [rows[i]["context"] for i in rest for _ in rows[i]["continuations"]]
    conts = [c for i in rest for c in rows[i]["continuations"]]
    flat = generator.loglikelihood(contexts, conts) if conts else []
    pos = 0
    for i in rest:
        k = len(rows[i]["continuations"])
        results[i] = {"logprobs": flat[pos : pos + k], "lengths": [len(c) for _, c in encoded[i]]}
        pos += k
    return results  # type: ignore[return-value]


def score_in_process(generator: Generator) -> Scorer:
    """A scorer running `generator` here (no Ray)."""

    def scorer(rows: list[Row], name: str = "") -> Scores:
        return {r["key"]: s for r, s in zip(rows, score_rows(generator, rows))}

    return scorer


def score_batch(generator: Generator, batch: pd.DataFrame) -> pd.DataFrame:
    """What a scoring pool's replica does with a batch: `logprobs` and `lengths` (JSON) for each row's
    `continuations` (JSON) after its `context`."""
    rows = [{"context": c, "continuations": json.loads(x)} for c, x in zip(batch["context"], batch["continuations"])]
    scored = score_rows(generator, rows)
    return batch.assign(logprobs=[json.dumps(s["logprobs"]) for s in scored],
                        lengths=[json.dumps(s["lengths"]) for s in scored])


def scores_path(work_dir: str | Path, name: str, model: ModelConfig, rows: list[Row]) -> Path:
    """Where `score_on_ray` keeps a job's scores. The name carries a digest of the model and the rows:
    a finished file is reused as it is, and changed prompts or another model never pick up stale shards."""
    blob = json.dumps([model.model_dump(mode="json"), rows], sort_keys=True)
    return Path(work_dir) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.scores.jsonl"


def score_on_ray(model: ModelConfig, resources: ResourcesConfig, work_dir: Path, shard_size: int,
                 pool: str = "eval.resources") -> Scorer:
    """A scorer sharding rows over a pool of `score_batch` replicas; results land in `work_dir/<name>-<digest>.scores.jsonl`.

    Rows are sorted by context length first, so a batch pads little; finished shards survive a kill
    and a re-run scores only the rest (`ShardedJsonl`).
    """

    def scorer(rows: list[Row], name: str = "scores") -> Scores:
        final = scores_path(work_dir, name, model, rows)
        if final.is_file():
            return {r["key"]: {"logprobs": r["logprobs"], "lengths": r["lengths"]} for r in read_rows(final)}
        ordered = sorted(rows, key=lambda r: (len(r["context"]), r["key"]))
        shards = ShardedJsonl(final, shard_size)
        todo = shards.pending(
            [{"key": r["key"], "context": r["context"], "continuations": json.dumps(r["continuations"])}
             for r in ordered],
            key="key",
        )
        if todo:
            shards.collect(
                {"key": r["key"], "logprobs": json.loads(r["logprobs"]), "lengths": json.loads(r["lengths"]),
                 "_shard": r["_shard"], "_row": r["_row"]}
                for r in stream_pool(todo, ModelReplica, dict(answer=score_batch, model=generator_model(model)),
                                     resources, pool)
            )
        shards.finalize()
        return {r["key"]: {"logprobs": r["logprobs"], "lengths": r["lengths"]} for r in read_rows(final)}

    return scorer


def reward_on_ray(ref: str, resources: ResourcesConfig, work_dir: Path, shard_size: int, dtype: str = "auto",
                  pool: str = "eval.resources") -> Scorer:
    """A scorer for a reward model: each continuation is an assistant reply to the row's `messages`.

    The "logprobs" it returns are rewards (same shape, so suites compare them the same way). Rows are
    flattened to one conversation each and scored by RM replicas (`score_conversations`), in resumable shards.
    """

    def scorer(rows: list[Row], name: str = "rewards") -> Scores:
        flat = []
        for r in rows:
            if "messages" not in r:
                raise ValueError(f"{name}: a reward model scores answers to a conversation; this suite gives none")
            for j, c in enumerate(r["continuations"]):
                conversation = [*r["messages"], {"role": "assistant", "content": c.strip()}]
                flat.append({"key": f"{r['key']}#{j}", "conversation": json.dumps(conversation, ensure_ascii=False)})
        digest = hashlib.sha256(json.dumps([ref, dtype, flat], sort_keys=True).encode()).hexdigest()[:12]
        final = Path(work_dir) / f"{name}-{digest}.rewards.jsonl"
        if not final.is_file():
            shards = ShardedJsonl(final, shard_size)
            todo = shards.pending(sorted(flat, key=lambda r: len(r["conversation"])), key="key")
            if todo:
                kwargs = dict(answer=score_conversations, model=reward_model(ref, dtype))
                rows_out = stream_pool(todo, ModelReplica, kwargs, resources, pool)
                shards.collect({"key": r["key"], "reward": float(r["reward"]), "_shard": r["_shard"],
                                "_row": r["_row"]} for r in rows_out)
            shards.finalize()
        rewards = {r["key"]: r["reward"] for r in read_rows(final)}
        return {r["key"]: {"logprobs": [rewards[f"{r['key']}#{j}"] for j in range(len(r["continuations"]))],
                           "lengths": [len(c) for c in r["continuations"]]} for r in rows}

    return scorer
