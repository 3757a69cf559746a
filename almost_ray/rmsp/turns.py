"""The turn logic of (RM-guided) self-play, as pure functions (ALMoST Section 2.2).

A dialogue is a row that moves through the turns of one Ray Data pipeline. Each assistant turn samples
N candidates; `best_of_n` keeps the highest-scored usable one (rejection sampling with the RM), or the
first usable one when there are no scores (plain self-play). Each user turn appends the user model's
follow-up. A degenerate turn (empty, no words, a word loop, an echo of an earlier turn) ends the dialogue
early and its reason is recorded, so the manifest can count how dialogues ended.

Rows carry their conversation as JSON strings (`messages`, `turns`, `candidates`, `scores`) so that
Ray Data moves them as plain Arrow strings; `status` is empty while a dialogue is still going.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable

import pandas as pd

from almost_ray.data.records import Messages
from almost_ray.models.config import SamplingParams
from almost_ray.prompts.templates import HUMAN, default_stop, human_assistant

# `status` values: why a dialogue ended.
MAX_TURNS = "max_turns"
DEGENERATE_ASSISTANT = "degenerate_assistant"
DEGENERATE_USER = "degenerate_user"

MIN_WORDS_FOR_LOOP = 12
MIN_DISTINCT_WORD_SHARE = 0.3


def role_prompt(role: str, messages: Messages, header: str) -> str:
    """The few-shot prompt a role's model continues.

    The assistant continues after `"\\n\\nAssistant:"` (ALMoST's Faithful/HHH prompting); the user model
    reads the same conversation and continues after `"\\n\\nHuman:"`, playing the person (User prompt,
    ALMoST Appendix A, Figure 5).
    """
    if role == "assistant":
        return human_assistant(messages, header)
    if role == "user":
        return human_assistant(messages, header, add_generation_prompt=False) + HUMAN
    raise ValueError(f"unknown role {role!r}")


def role_stop(role: str, extra: Iterable[str] = ()) -> list[str]:
    """The role's stop strings (the other speaker's turn prefix, the dialogue separator) plus `extra`."""
    if role not in ("assistant", "user"):
        raise ValueError(f"unknown role {role!r}")
    stops = default_stop("human_assistant", role)
    return stops + [s for s in extra if s not in stops]


def degenerate_reason(text: str, history: Iterable[str] = ()) -> str | None:
    """Why a generated turn cannot continue a dialogue, or None when it is usable.

    `empty`: nothing left after the stop strings; `no_words`: no letter or digit; `loop`: at least 12
    words of which under 30 % are distinct (a sampling loop); `echo`: it repeats an earlier turn.
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    if not any(c.isalnum() for c in stripped):
        return "no_words"
    words = stripped.lower().split()
    if len(words) >= MIN_WORDS_FOR_LOOP and len(set(words)) / len(words) < MIN_DISTINCT_WORD_SHARE:
        return "loop"
    if any(stripped == h.strip() for h in history):
        return "echo"
    return None


def best_of_n(scores: list[float] | None, usable: list[bool]) -> int | None:
    """Index of the best usable candidate: the highest RM score (the first on ties), or the first
    usable candidate when there are no scores. None when no candidate is usable."""
    if scores is not None and len(scores) != len(usable):
        raise ValueError(f"{len(scores)} scores for {len(usable)} candidates")
    choices = [i for i, ok in enumerate(usable) if ok]
    if not choices:
        return None
    if scores is None:
        return choices[0]
    return max(choices, key=lambda i: (scores[i], -i))


def take_assistant_turn(row: dict, turn: int, max_turns: int) -> dict:
    """Record the N candidates of assistant turn `turn`, append the chosen one, or end the dialogue."""
    if row["status"]:
        return row
    messages = json.loads(row["messages"])
    candidates = json.loads(row["candidates"])
    scores = json.loads(row["scores"]) if row.get("scores") else None
    history = [m["content"] for m in messages]
    reasons = [degenerate_reason(c, history) for c in candidates]
    chosen = best_of_n(scores, [r is None for r in reasons])
    turns = json.loads(row["turns"])
    turns.append({"turn": turn, "candidates": candidates, "scores": scores, "chosen": chosen, "degenerate": reasons})
    status = ""
    if chosen is None:
        status = DEGENERATE_ASSISTANT
    else:
        messages.append({"role": "assistant", "content": candidates[chosen].strip()})
        if turn >= max_turns:
            status = MAX_TURNS
    return {**row, "messages": json.dumps(messages, ensure_ascii=False), "turns": json.dumps(turns, ensure_ascii=False),
            "status": status, "candidates": "[]", "scores": ""}


def take_user_turn(row: dict) -> dict:
    """Append the user model's follow-up, or end the dialogue when it is degenerate (kept as `dropped_user`)."""
    if row["status"]:
        return row
    messages = json.loads(row["messages"])
    (text,) = json.loads(row["candidates"])
    reason = degenerate_reason(text, [m["content"] for m in messages])
    if reason is not None:
        return {**row, "status": DEGENERATE_USER, "dropped_user": json.dumps({"text": text, "reason": reason}),
                "candidates": "[]"}
    messages.append({"role": "user", "content": text.strip()})
    return {**row, "messages": json.dumps(messages, ensure_ascii=False), "candidates": "[]"}


def select_batch(batch: pd.DataFrame, turn: int, max_turns: int) -> pd.DataFrame:
    """Ray Data step after the RM pool (or straight after the assistant pool in plain self-play)."""
    if "scores" not in batch:
        batch = batch.assign(scores="")
    return pd.DataFrame([take_assistant_turn(r, turn, max_turns) for r in batch.to_dict("records")],
                        columns=batch.columns)


def user_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data step after the user pool."""
    rows = [take_user_turn(r) for r in batch.to_dict("records")]
    return pd.DataFrame(rows, columns=list(batch.columns))


def start_row(query_id: str, text: str) -> dict:
    """A dialogue that has only its initial query (step 1's output), ready for the first assistant turn."""
    messages = [{"role": "user", "content": text}]
    return {"id": query_id, "messages": json.dumps(messages, ensure_ascii=False), "turns": "[]", "status": "",
            "candidates": "[]", "scores": "", "dropped_user": ""}


def dialogue_record(row: dict, meta: dict) -> dict:
    """The output record: TRL's `messages` (ending with an assistant turn) plus every assistant turn's
    candidates, RM scores and chosen index, why the dialogue ended, and the run's switches (`meta`)."""
    messages = json.loads(row["messages"])
    while messages and messages[-1]["role"] != "assistant":  # a trailing follow-up got no answer
        messages.pop()
    record = {
        "id": row["id"],
        "messages": messages or json.loads(row["messages"])[:1],
        "num_turns": sum(m["role"] == "assistant" for m in messages),
        "end_reason": row["status"] or MAX_TURNS,
        "assistant_turns": json.loads(row["turns"]),
        **meta,
    }
    if row.get("dropped_user"):
        record["dropped_user"] = json.loads(row["dropped_user"])
    return record


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def turn_metrics(records: Iterable[dict], max_turns: int) -> dict[str, dict]:
    """Per assistant turn: how many dialogues reached it, the mean RM score of the chosen response, of
    the first sample (what plain self-play would have kept in the same context), of all N candidates,
    and the mean best-vs-mean gap (chosen score minus the mean of its N candidates' scores)."""
    chosen: dict[int, list[float]] = {t: [] for t in range(1, max_turns + 1)}
    first, mean_all, gap = ({t: [] for t in chosen} for _ in range(3))
    reached = Counter()
    for rec in records:
        for t in rec["assistant_turns"]:
            reached[t["turn"]] += 1
            scores, idx = t["scores"], t["chosen"]
            if not scores or idx is None or any(not math.isfinite(s) for s in scores):
                continue
            m = sum(scores) / len(scores)
            chosen[t["turn"]].append(scores[idx])
            first[t["turn"]].append(scores[0])
            mean_all[t["turn"]].append(m)
            gap[t["turn"]].append(scores[idx] - m)
    return {
        str(t): {
            "reached": reached[t],
            "scored": len(chosen[t]),
            "mean_chosen_reward": _mean(chosen[t]),
            "mean_first_sample_reward": _mean(first[t]),
            "mean_candidate_reward": _mean(mean_all[t]),
            "mean_best_minus_mean": _mean(gap[t]),
        }
        for t in chosen
    }


def end_counts(records: Iterable[dict]) -> dict[str, int]:
    """How many dialogues ended for each reason, and how many reached each length."""
    reasons, lengths = Counter(), Counter()
    for rec in records:
        reasons[rec["end_reason"]] += 1
        lengths[rec["num_turns"]] += 1
    return {**{f"ended_{k}": v for k, v in sorted(reasons.items())},
            **{f"turns_{k}": v for k, v in sorted(lengths.items())}}


# --- what the role replicas do with a batch (`cluster.replicas.ModelReplica`, one model per actor) -----------

def answer_role(generator, batch: pd.DataFrame, roles: dict[str, dict], role: str) -> pd.DataFrame:
    """The turn of `role` (assistant: N samples; user: one follow-up) for each active dialogue of the batch.

    One replica can play the assistant and the user when both have the same model (`stage.role_pools`):
    one model load and one copy in memory instead of two, and the same outputs, since every prompt's
    samples are seeded by the prompt itself (`models/text.py`), not by the replica that answers."""
    params = SamplingParams.model_validate(roles[role]["sampling"])
    sampling = params.model_copy(update={"stop": role_stop(role, params.stop)})
    return generate_candidates(generator, sampling, role, roles[role]["header"], batch)


def generate_candidates(generator, sampling: SamplingParams, role: str, header: str, batch: pd.DataFrame) -> pd.DataFrame:
    active = [i for i, s in enumerate(batch["status"]) if not s]
    prompts = [role_prompt(role, json.loads(batch["messages"].iloc[i]), header) for i in active]
    outputs = generator.generate(prompts, sampling) if prompts else []
    candidates = ["[]"] * len(batch)
    for i, samples in zip(active, outputs):
        candidates[i] = json.dumps(samples, ensure_ascii=False)
    return batch.assign(candidates=candidates)


def score_candidates(rm, batch: pd.DataFrame) -> pd.DataFrame:
    """The RM's score of each candidate, judged as the next assistant turn of its dialogue (ALMoST Section
    2.2: the RM scores the N responses), in one `rm.score` call (any object with RewardModel's `score`)."""
    conversations, owners = [], []
    for i, (status, messages, candidates) in enumerate(zip(batch["status"], batch["messages"], batch["candidates"])):
        if status:
            continue
        context = json.loads(messages)
        for text in json.loads(candidates):
            conversations.append([*context, {"role": "assistant", "content": text}])
            owners.append(i)
    flat = rm.score(conversations) if conversations else []
    per_row: list[list[float]] = [[] for _ in range(len(batch))]
    for i, s in zip(owners, flat):
        per_row[i].append(float(s))
    return batch.assign(scores=[json.dumps(s) if s else "" for s in per_row])
