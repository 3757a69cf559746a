"""Preference pairs from the three formats the project meets, as two whole conversations.

- Our comparisons (`records.Comparison`, TRL's preference format): `prompt` is the user's query
  text (ALMoST's synthetic comparisons are single-turn), or a dialogue context already rendered
  as `Human: ... Assistant: ... Human: ...`, which is parsed back into turns; `chosen`/`rejected`
  are the two assistant replies. TRL's conversational variant (lists of messages) is read too.
- HH-RLHF (Bai et al., 2022): `chosen`/`rejected` are whole dialogues
  `"\\n\\nHuman: ...\\n\\nAssistant: ..."` that differ in the last assistant turn; each is split at
  its last `"\\n\\nAssistant:"`.
- The paired StackExchange format (`lvwerra/stack-exchange-paired`, which ALMoST's As-is RM is trained on):
  `question`, `response_j` (the preferred answer) and `response_k`; one user turn, two replies.

Each becomes a `PreferencePair` of two conversations ending with the judged assistant turn, which
`models.reward.rm_text` renders identically for training (`train-rm`) and scoring (`RewardModel`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from almost_ray.data.atomic import atomic_open
from almost_ray.data.records import Messages, RecordError
from almost_ray.data.sources import iter_rows

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    chosen: Messages
    rejected: Messages

    @property
    def chosen_response(self) -> str:
        return self.chosen[-1]["content"]

    @property
    def rejected_response(self) -> str:
        return self.rejected[-1]["content"]


def parse_human_assistant(text: str) -> Messages:
    """`"\\n\\nHuman: q\\n\\nAssistant: a"` -> `[{"role": "user", ...}, {"role": "assistant", ...}]`.

    Text before the first turn prefix (a few-shot header) is dropped; contents are stripped, as
    `templates.human_assistant` strips them when rendering.
    """
    parts = _TURN.split(text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def split_hh(dialogue: str) -> Messages:
    """An HH-RLHF dialogue as messages; it must end with an assistant turn (the judged reply)."""
    cut = dialogue.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    context = parse_human_assistant(dialogue[:cut])
    return [*context, {"role": "assistant", "content": dialogue[cut + len("\n\nAssistant:") :].strip()}]


def context_messages(prompt: str | list) -> Messages:
    """The conversation before the judged reply, from a comparison's `prompt` field."""
    if isinstance(prompt, list):  # TRL conversational format
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    if re.match(r"\s*(Human|Assistant):", prompt):
        return parse_human_assistant(prompt if prompt.startswith("\n\n") else "\n\n" + prompt.lstrip())
    return [{"role": "user", "content": prompt}]


def _reply(value) -> str:
    if isinstance(value, list):  # TRL conversational: [{"role": "assistant", "content": ...}]
        return value[-1]["content"]
    return value


STACK_EXCHANGE_FIELDS = ("question", "response_j", "response_k")


def stack_exchange_pair(obj: dict) -> PreferencePair:
    """`{"question", "response_j", "response_k"}`: response_j is preferred (higher-voted, as in the dataset)."""
    for field in STACK_EXCHANGE_FIELDS:
        if field not in obj:
            raise ValueError(f"{field}: field required (paired StackExchange format)")
        if not isinstance(obj[field], str):
            raise ValueError(f"{field}: expected a string, got {type(obj[field]).__name__}")
        if not obj[field].strip():
            raise ValueError(f"{field}: empty")
    context = [{"role": "user", "content": obj["question"].strip()}]
    return PreferencePair(
        chosen=[*context, {"role": "assistant", "content": obj["response_j"].strip()}],
        rejected=[*context, {"role": "assistant", "content": obj["response_k"].strip()}],
    )


def pair_from_record(obj: dict) -> PreferencePair:
    """One JSON object in any of the formats (see the module docstring); raises ValueError naming the field."""
    if any(field in obj for field in STACK_EXCHANGE_FIELDS):
        return stack_exchange_pair(obj)
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise ValueError(f"{field}: field required")
        if not isinstance(obj[field], (str, list)):
            raise ValueError(f"{field}: expected a string, got {type(obj[field]).__name__}")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], (str, list)):
            raise ValueError(f"prompt: expected a string, got {type(obj['prompt']).__name__}")
        context = context_messages(obj["prompt"])
        return PreferencePair(
            chosen=[*context, {"role": "assistant", "content": _reply(obj["chosen"]).strip()}],
            rejected=[*context, {"role": "assistant", "content": _reply(obj["rejected"]).strip()}],
        )
    pairs = []
    for field in ("chosen", "rejected"):
        try:
            pairs.append(split_hh(obj[field]))
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{field}: not an HH-RLHF dialogue ({err}); or add a 'prompt' field") from None
    return PreferencePair(chosen=pairs[0], rejected=pairs[1])


def usable(pair: PreferencePair) -> PreferencePair:
    """A pair an RM can learn from: two replies that differ (a degenerate pair only adds noise). One empty
    reply is a real preference (HH-RLHF's test set has an assistant that said nothing), so it is kept."""
    if pair.chosen_response.strip() == pair.rejected_response.strip():
        raise ValueError("chosen: identical to rejected (a degenerate pair)")
    return pair


def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Every pair of a `.jsonl` file in any of the formats; a bad line raises RecordError naming file:line:field."""
    pairs = []
    for lineno, obj in iter_rows(path):
        if limit is not None and len(pairs) >= limit:
            break
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{lineno}: expected a JSON object")
        try:
            pairs.append(usable(pair_from_record(obj)))
        except ValueError as err:
            raise RecordError(f"{path}:{lineno}: {err}") from None
    if not pairs:
        raise RecordError(f"{path}: no rows")
    return pairs


def is_heldout(context: Messages, fraction: float) -> bool:
    """Whether the pairs of this query (the conversation before the judged reply) are held out.

    A stable hash of the query decides, so every pair of one query lands on the same side, the split
    does not depend on file order, and a re-run splits the same way: the RM's held-out accuracy then
    measures queries it never saw, not other rung pairs of queries it trained on.
    """
    digest = hashlib.sha256(json.dumps(context, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_query(path: str | Path, fraction: float, train_out: str | Path, heldout_out: str | Path) -> tuple[int, int]:
    """Copy each line of a preference file to `train_out` or `heldout_out` (`is_heldout`); returns both counts."""
    counts = [0, 0]
    with atomic_open(train_out) as train, atomic_open(heldout_out) as heldout:
        for lineno, obj in iter_rows(path):
            try:
                pair = pair_from_record(obj) if isinstance(obj, dict) else None
            except ValueError as err:
                raise RecordError(f"{path}:{lineno}: {err}") from None
            if pair is None:
                raise RecordError(f"{path}:{lineno}: expected a JSON object")
            side = int(is_heldout(pair.chosen[:-1], fraction))
            (heldout if side else train).write(json.dumps(obj, ensure_ascii=False) + "\n")
            counts[side] += 1
    return counts[0], counts[1]
