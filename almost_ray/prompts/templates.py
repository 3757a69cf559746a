"""Prompt formats: the papers' `Human:`/`Assistant:` turns, Hewitt et al.'s Tulu format, chat templates.

A conversation is a list of `{"role", "content"}` messages (TRL's conversational form); each
renderer turns it into the text a model continues as the assistant.
"""

from __future__ import annotations

from importlib import resources

from almost_ray.data.records import Messages
from almost_ray.models.config import PromptFormat

# ALMoST / HH-RLHF / BIG-bench turn prefixes. The prompt ends at "Assistant:" without a trailing
# space: a trailing space would make the model start from an unusual token boundary.
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
STOP_HUMAN = "\nHuman:"
# Hewitt et al. use the Tulu format; response tuning empties the user turn.
TULU_USER, TULU_ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def human_assistant(messages: Messages, header: str = "", add_generation_prompt: bool = True) -> str:
    """`{header}\\n\\nHuman: q\\n\\nAssistant: a ...\\n\\nAssistant:` as in ALMoST and HH-RLHF."""
    parts = [header.rstrip("\n")] if header else []
    for m in messages:
        if m["role"] == "system":
            continue
        prefix = HUMAN if m["role"] == "user" else ASSISTANT
        parts.append(f"{prefix} {m['content'].strip()}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def tulu(messages: Messages, add_generation_prompt: bool = True) -> str:
    """`<|user|>\\n{q}\\n<|assistant|>\\n{a}\\n...` (Hewitt et al., Section 3)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            continue
        prefix = TULU_USER if m["role"] == "user" else TULU_ASSISTANT
        parts.append(f"{prefix}{m['content']}\n")
    if add_generation_prompt:
        parts.append(TULU_ASSISTANT)
    return "".join(parts)


def render_prompt(fmt: PromptFormat, messages: Messages, tokenizer=None, header: str = "") -> str:
    """The text a model continues as the assistant's next turn."""
    if fmt == "raw":
        if len(messages) != 1:
            raise ValueError("prompt_format 'raw' takes a single message")
        return header + messages[0]["content"]
    if fmt == "human_assistant":
        return human_assistant(messages, header)
    if fmt == "tulu":
        return header + tulu(messages)
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template")
        return header + tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {fmt!r}")


DIALOGUE_SEPARATOR = "\n\n-----"


STOP_ASSISTANT = "\nAssistant:"
# The one table of stop strings, per prompt format and the role being written. The assistant must not
# write the human's next turn (or start a new few-shot dialogue); the user model (RMSP, ALMoST Appendix
# A) must not write the assistant's answer nor a second human turn. The bare prefixes also catch a turn
# that leaks in mid-line ("... Human: I'm sure"), which ALMoST's filter drops anyway.
STOP_STRINGS: dict[str, dict[str, list[str]]] = {
    "human_assistant": {
        "assistant": [STOP_HUMAN, DIALOGUE_SEPARATOR, "Human:"],
        "user": [STOP_ASSISTANT, STOP_HUMAN, DIALOGUE_SEPARATOR, "Assistant:", "Human:"],
    },
    "tulu": {"assistant": ["<|user|>"], "user": ["<|assistant|>", "<|user|>"]},
}


def default_stop(fmt: PromptFormat, role: str = "assistant") -> list[str]:
    """Stop strings that keep a model from writing the other speaker's turn (or a new dialogue)."""
    return list(STOP_STRINGS.get(fmt, {}).get(role, []))


def fewshot_header(text: str, shots: int) -> str:
    """The instruction and the first `shots` dialogues of an ALMoST-style prompt file.

    The files (ALMoST's `HHH_prompt.txt`, `Faithful_prompt.txt`, and ours in `almost_ray/prompts/`) are
    blocks separated by `"\n\n-----"`: the first block is the instruction, each later one a dialogue.
    The query is then appended as `"\n\nHuman: {query}\n\nAssistant:"` (see `human_assistant`).
    """
    blocks = text.split(DIALOGUE_SEPARATOR)
    header, dialogues = blocks[0].strip("\n"), [b for b in blocks[1:] if b.strip()]
    if shots > len(dialogues):
        raise ValueError(f"asked for {shots} shots but the prompt has only {len(dialogues)} dialogues")
    return DIALOGUE_SEPARATOR.join([header, *dialogues[:shots]]) + DIALOGUE_SEPARATOR


def load_prompt_text(source: str) -> str:
    """A prompt file by packaged name (`faithful` -> `almost_ray/prompts/faithful.txt`) or by path."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8")
    if "/" in source or source.endswith(".txt"):
        raise FileNotFoundError(f"prompt file not found: {source}")
    return packaged_text(f"{source}.txt")


def packaged_text(name: str) -> str:
    """A text file shipped in `almost_ray/prompts/` (our own prompts and seed queries)."""
    return resources.files("almost_ray.prompts").joinpath(name).read_text(encoding="utf-8")
