"""Which prompts PPO trains on (ALMoST Section 2.3): the first user turn of each RMSP dialogue.

One rule for both engines, ours (`rl/stage.py`) and OpenRLHF (`rl/openrlhf.py`): an explicit prompts
file wins (the `prompts` argument, then `ppo.prompts`); otherwise the first user turns of
`<run dir>/rmsp/dialogues.jsonl`, in file order. The paper trains on the queries that started the
self-play dialogues, i.e. exactly those first turns. Rendering (Human:/Assistant:, Tulu, chat template)
and dropping prompts that are too long are the caller's business: they need the policy's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from almost_ray.config_base import ConfigError
from almost_ray.data.records import RecordError
from almost_ray.data.sources import iter_rows, parse_source
from almost_ray.rl.config import PPOConfig

# A prompts .jsonl row: a dialogue (`messages`, TRL's form), a Query record (`text`), or a bare `prompt`.
PROMPT_KEYS = ("prompt", "text")


def prompts_path(cfg: PPOConfig, run_dir: Path, prompts: Path | None = None) -> Path:
    """The file the prompts come from: `prompts`, else `cfg.prompts`, else `<run dir>/rmsp/dialogues.jsonl`."""
    return Path(prompts or cfg.prompts or Path(run_dir) / "rmsp" / "dialogues.jsonl")


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


def load_prompts(cfg: PPOConfig, run_dir: Path, prompts: Path | None = None) -> list[str]:
    """The prompts, in file order: `.txt` is one prompt per non-blank line; `.jsonl`, Parquet, `save_to_disk`
    or hub rows as `first_user_turn` reads them. A missing or empty source is a `ConfigError` naming it."""
    path = prompts_path(cfg, run_dir, prompts)
    source = parse_source(path)
    if source.kind in ("jsonl", "text") and not source.path.is_file():
        hint = "" if (prompts or cfg.prompts) else " (run `almost-ray rmsp` first, or set ppo.prompts)"
        raise ConfigError(f"{path}: prompts file not found{hint}")
    # any source (`sources.py`): a .txt's lines arrive as {"text": line}, dataset rows as dicts
    found = [first_user_turn(row, f"{path}:{number}") for number, row in iter_rows(path)]
    if not found:
        raise ConfigError(f"{path}: no prompts in the file")
    return found
