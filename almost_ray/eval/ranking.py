"""The response-ranking capability (Hewitt et al. Section 4.2, Eq. 3, Table 2).

For instruction-response pairs (x, y) and (x', y') drawn from one dataset, the capability holds on a
triple when p(y | x) > p(y' | x): the model prefers the instruction's own response to a desirable
response written for another instruction. The report gives the fraction of triples where it holds.
Each item is compared with `others_per_item` responses of other items, drawn with a fixed seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from almost_ray.data.records import RecordError
from almost_ray.data.sources import read_rows
from almost_ray.eval.config import RankingEvalConfig
from almost_ray.eval.scoring import Scores
from almost_ray.eval.stats import proportion
from almost_ray.eval.templates import continuation, parse_dialogue, render_messages


@dataclass(frozen=True)
class Pair:
    index: int
    messages: tuple[tuple[str, str], ...]  # the instruction (a conversation ending with a user turn)
    response: str


def _pair_from(obj: dict, where: str) -> tuple[list[dict], str]:
    if "chosen" in obj:  # HH-RLHF: the whole dialogue, the response is its last assistant turn
        try:
            messages = parse_dialogue(obj["chosen"])
        except ValueError as err:
            raise RecordError(f"{where}: chosen: {err}") from None
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"{where}: chosen: the dialogue must end with an Assistant turn")
        return messages[:-1], messages[-1]["content"]
    prompt = obj.get("prompt", obj.get("instruction"))
    response = obj.get("response", obj.get("output"))
    if isinstance(obj.get("messages"), list) and obj["messages"] and obj["messages"][-1].get("role") == "assistant":
        return obj["messages"][:-1], obj["messages"][-1]["content"]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise RecordError(f"{where}: expected 'chosen', 'messages', or 'prompt'/'instruction' with "
                          "'response'/'output' (strings)")
    return [{"role": "user", "content": prompt}], response


def load_pairs(path: str | Path, max_chars: int, limit: int | None = None) -> list[Pair]:
    """Pairs in file order; pairs with an instruction or response over `max_chars` are skipped."""
    pairs: list[Pair] = []
    for lineno, obj in enumerate(read_rows(path), start=1):
        if limit is not None and len(pairs) >= limit:
            break
        messages, response = _pair_from(obj, f"{path}:{lineno}")
        if not response.strip() or sum(len(m["content"]) for m in messages) > max_chars or len(response) > max_chars:
            continue
        pairs.append(Pair(len(pairs), tuple((m["role"], m["content"]) for m in messages), response))
    return pairs


def draw_others(n: int, k: int, seed: int) -> list[list[int]]:
    """For each item, `k` distinct other items (uniform, seeded)."""
    if n < 2:
        raise ValueError("response ranking needs at least two pairs")
    rng = random.Random(seed)
    k = min(k, n - 1)
    return [[j if j < i else j + 1 for j in rng.sample(range(n - 1), k)] for i in range(n)]


def build_rows(pairs: list[Pair], cfg: RankingEvalConfig, tokenizer=None) -> list[dict]:
    """One row per item: its own response first, then the other items' responses."""
    others = draw_others(len(pairs), cfg.others_per_item, cfg.seed)
    rows = []
    for p, o in zip(pairs, others):
        context = render_messages([{"role": r, "content": c} for r, c in p.messages], cfg.style, tokenizer)
        responses = [p.response] + [pairs[j].response for j in o]
        rows.append({"key": str(p.index), "context": context, "others": o,
                     "continuations": [continuation(context, r) for r in responses]})
    return rows


def summarize(rows: list[dict], scores: Scores) -> tuple[dict, list[dict]]:
    records = []
    for row in rows:
        own, *rest = scores[row["key"]]["logprobs"]
        records.append({"index": int(row["key"]), "others": row["others"], "own": own, "other_scores": rest,
                        "wins": sum(own > x for x in rest), "triples": len(rest)})
    wins = sum(r["wins"] for r in records)
    triples = sum(r["triples"] for r in records)
    metrics = {"ranking_capability": proportion(wins, triples), "n_items": len(records), "n_triples": triples}
    return metrics, records
