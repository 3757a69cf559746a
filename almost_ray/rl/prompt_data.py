"""Which prompts PPO trains on (ALMoST Section 2.3): the first user turn of each RMSP dialogue.

One rule for both engines, ours (`rl/stage.py`) and OpenRLHF (`rl/openrlhf.py`): `ppo.prompts` (the CLI's
`--prompts`) when set, otherwise the first user turns of the rmsp stage's dialogues (`runs/paths.py`), in file
order. The paper trains on the queries that started the
self-play dialogues, i.e. exactly those first turns. Rendering (Human:/Assistant:, Tulu, chat template)
and dropping prompts that are too long are the caller's business: they need the policy's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from almost_ray.data.records import RecordError
from almost_ray.data.sources import iter_rows

# A prompts .jsonl row: a dialogue (`messages`, TRL's form), a Query record (`text`), or a bare `prompt`.
PROMPT_KEYS = ("prompt", "text")


def first_user_turn(row: object, where: str) -> str:
    """The prompt of one .jsonl row: the first user message of `messages`, else `prompt`/`text`."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        turns = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise RecordError(f"{where}: messages: no user turn with text")
        return turns[0].strip()
    for key in PROMPT_KEYS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    raise RecordError(f"{where}: expected 'messages' or a non-empty 'prompt'/'text' field")


def load_prompts(source: str | Path) -> list[str]:
    """The prompts, in file order: `.txt` is one prompt per non-blank line; `.jsonl`, Parquet, `save_to_disk`
    or hub rows as `first_user_turn` reads them. An empty source is a `RecordError` naming it."""
    # any source (`sources.py`): a .txt's lines arrive as {"text": line}, dataset rows as dicts
    found = [first_user_turn(row, f"{source}:{number}") for number, row in iter_rows(source)]
    if not found:
        raise RecordError(f"{source}: no rows")
    return found
