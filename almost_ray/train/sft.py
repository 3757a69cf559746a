"""The `train_sft` stage (`almost-ray train-sft`): supervised finetuning with loss on assistant tokens only, on `loop.py`.

One path, three methods, chosen by `train_sft.mode`:

- `sft`: ALMoST's SFT (Section 2.2, Appendix D.2) on RMSP demonstrations, rendered with the papers'
  `Human:` / `Assistant:` prefixes;
- `response_tuning` (Hewitt et al. Section 4.1, Eq. 2): every user turn is emptied, so the model
  learns p(response) alone: `<|user|>\\n\\n<|assistant|>\\n{response}` in the Tulu format;
- `single_task` (Hewitt et al. Section 5): a narrow prompt → completion dataset (poems, recipes,
  GSM ...), trained like instruction tuning in the Tulu format.

Input rows are dialogues (`{"messages": [...]}`, `records.Dialogue`) or TRL prompt-completion rows
(`{"prompt", "completion"}`). The rendering is the one generation uses (`templates.human_assistant`
and `templates.tulu`), with EOS after the final reply so the model learns to stop.

This module is also the SFT *task* of the loop: `load_config`, `load_model`, `empty_model`, `load_tokenizer`,
`length`, `units`, `micro_loss`, `step_metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from almost_ray.config import Config
from almost_ray.data.records import Dialogue, Messages, RecordError, field_error
from almost_ray.data.sources import iter_rows, require
from almost_ray.models import loading
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.packing import pack_sequences
from almost_ray.prompts.templates import ASSISTANT, HUMAN, TULU_ASSISTANT, TULU_USER
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage
from almost_ray.train import loop
from almost_ray.train.config import TrainSFTConfig
from almost_ray.train.data import encode_supervised, pad_batch
from almost_ray.train.losses import IGNORE_INDEX, token_nll_sum


def render(messages: Messages, prompt_format: str) -> tuple[str, list[tuple[int, int]]]:
    """The training text of a conversation and the character spans of its assistant replies.

    `human_assistant` gives exactly `templates.human_assistant(messages, add_generation_prompt=False)`;
    `tulu` gives `templates.tulu(messages, add_generation_prompt=False)` without the final newline
    (the reply is followed by EOS, as in Hewitt et al. Section 3). A generation prompt rendered by the
    same templates for the first k turns is a prefix of this text.
    """
    text, spans = "", []
    turns = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(turns):
        if prompt_format == "human_assistant":
            prefix = HUMAN if m["role"] == "user" else ASSISTANT
            body = f" {m['content'].strip()}"
        elif prompt_format == "tulu":
            prefix = TULU_USER if m["role"] == "user" else TULU_ASSISTANT
            body = m["content"] + ("\n" if i < len(turns) - 1 else "")
        else:
            raise ValueError(f"unknown prompt_format {prompt_format!r}")
        if m["role"] == "assistant":
            start = len(text) + len(prefix)
            spans.append((start, start + len(body.rstrip("\n"))))
        text += prefix + body
    return text, spans


def apply_mode(messages: Messages, mode: str) -> Messages:
    """Response tuning empties the instructions (Hewitt et al. Eq. 2); the other modes keep them."""
    if mode == "response_tuning":
        return [{**m, "content": ""} if m["role"] == "user" else m for m in messages]
    return messages


def load_conversations(path: str | Path) -> list[Messages]:
    """Dialogues or prompt-completion rows; a bad line raises RecordError naming file:line:field."""
    out = []
    for lineno, obj in iter_rows(path):
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{lineno}: expected a JSON object")
        if "messages" in obj:
            try:
                messages = [m.model_dump() for m in Dialogue.model_validate(obj).messages]
            except ValidationError as err:
                raise RecordError(f"{path}:{lineno}: {field_error(err)}") from None
        elif "prompt" in obj and "completion" in obj:
            messages = []
            for field, role in (("prompt", "user"), ("completion", "assistant")):
                value = obj[field]
                if isinstance(value, str):
                    messages.append({"role": role, "content": value})
                elif isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
                    messages.extend({"role": m.get("role", role), "content": m["content"]} for m in value)
                else:
                    raise RecordError(f"{path}:{lineno}: {field}: expected a string or a list of messages")
        else:
            raise RecordError(f"{path}:{lineno}: expected 'messages', or 'prompt' and 'completion'")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError(f"{path}:{lineno}: messages: no assistant turn to learn")
        out.append(messages)
    if not out:
        raise RecordError(f"{path}: no rows")
    return out


def encode_conversations(conversations: list[Messages], tokenizer, cfg: TrainSFTConfig) -> list[dict]:
    """Token ids and assistant-only labels; conversations left without a supervised token are dropped."""
    examples = []
    for messages in conversations:
        text, spans = render(apply_mode(messages, cfg.mode), cfg.prompt_format)
        ends_with_reply = messages[-1]["role"] == "assistant"
        ex = encode_supervised(tokenizer, text, spans, cfg.max_length, eos_supervised=ends_with_reply)
        if (ex["labels"] != IGNORE_INDEX).any():
            examples.append(ex)
    return examples


def load_tokenizer(model_dir: str | Path):
    """`models.loading.load_tokenizer` for training: right padding (`train.data.pad_batch` pads right)."""
    return loading.load_tokenizer(model_dir, padding_side="right")


def load_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def load_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)


def empty_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def length(example: dict) -> int:
    return len(example["input_ids"])


def units(example: dict) -> int:
    return int((example["labels"] != IGNORE_INDEX).sum())  # the loss is a mean over supervised tokens


def micro_loss(model, rows: list[dict], device: torch.device,
               padding_free: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token NLL over assistant tokens; the vocabulary projection runs only where needed.

    Padding-free, the rows are one packed row (`models.packing`) and no layer computes a pad token.
    """
    row = pack_sequences([r["input_ids"] for r in rows]) if padding_free else None
    if row is not None:
        labels = torch.from_numpy(np.concatenate([r["labels"] for r in rows]).astype(np.int64))[None, :]
        inputs = {"input_ids": row.input_ids.to(device), **row.attention_kwargs(device)}
    else:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        input_ids = pad_batch([r["input_ids"] for r in rows], pad).to(device)
        labels = pad_batch([r["labels"] for r in rows], IGNORE_INDEX)
        lens = torch.tensor([len(r["input_ids"]) for r in rows], device=device)
        attention_mask = (torch.arange(input_ids.size(1), device=device)[None, :] < lens[:, None]).long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    targets = torch.full_like(labels, IGNORE_INDEX)  # position t predicts token t+1 of its own sequence
    targets[:, :-1] = labels[:, 1:]
    if row is not None:
        targets[:, row.ends] = IGNORE_INDEX  # a sequence's last token does not predict the next one's first
    targets = targets.to(device)
    keep = targets != IGNORE_INDEX  # keep the hidden states whose next token is supervised
    logits = model(**inputs, logits_to_keep=keep).logits
    nll, count = token_nll_sum(logits.reshape(-1, logits.size(-1)), targets[keep])
    return nll, {"loss": nll.detach(), "tokens": count.float()}


def step_metrics(totals: dict[str, float], units: int, samples: int) -> dict[str, float]:
    return {"loss": totals["loss"] / units, "supervised_tokens": int(totals["tokens"])}


def check(cfg: Config) -> None:
    """Every dialogue row, and the base model, before Ray starts or a model is converted."""
    require(paths.train_sft_dialogues(cfg), "train_sft.dialogues", None if cfg.train_sft.dialogues else "rmsp")
    load_conversations(paths.train_sft_dialogues(cfg))
    check_model_ref(cfg.train_sft.model, "train_sft.model")


def work(cfg: Config) -> Outcome:
    """Encode the dialogues (assistant tokens supervised) and finetune into `<stage>/model`."""
    t = cfg.train_sft
    source = paths.train_sft_dialogues(cfg)
    loop.start_workers(cfg, "train_sft")
    model_dir = resolve_model_dir(t.model)
    conversations = load_conversations(source)
    examples = encode_conversations(conversations, load_tokenizer(model_dir), t)
    if not examples:
        raise RecordError(f"{source}: no dialogue keeps an assistant token within max_length={t.max_length}")
    metrics = loop.train_and_plot("sft", t, examples, model_dir, paths.stage_dir(cfg, "train_sft"),
                                  ["loss", "lr"], t.mode)
    return Outcome(counts={"dialogues": len(conversations), "trained": len(examples)}, metrics=metrics)


STAGE = Stage(
    "train_sft", "supervised finetuning on the RMSP dialogues (Ray Train, FSDP)",
    section=lambda c: c.train_sft,
    inputs=lambda c: {"dialogues": paths.train_sft_dialogues(c)},
    outputs=lambda c: {"model": paths.sft_model(c)},
    work=work, check=check,
    headline=("counts.*", "metrics.steps", "metrics.final_loss"),
)


def run(cfg: Config) -> Path:
    """Finetune into `<run dir>/<train_sft.mode>/model`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)
