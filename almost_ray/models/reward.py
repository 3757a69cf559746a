"""Reward-model scoring: a sequence classifier with one output, r(conversation) -> float.

The RM reads a conversation rendered in the papers' `Human:`/`Assistant:` format, ending with the
assistant turn being judged, and its score is the head's output at the last non-pad token (how
transformers' `*ForSequenceClassification` pools). `score_conversations` is what a pool's replica
(`cluster.replicas.ModelReplica` holding one RM) does with a batch: the As-is filter of step 1, eval_rm and
the eval suites scored by an RM use the same pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from almost_ray.data.records import Messages
from almost_ray.models.loading import load_tokenizer, resolve_model_dir, torch_dtype
from almost_ray.prompts.templates import human_assistant


def rm_text(messages: Messages) -> str:
    """The text an RM scores: the whole conversation, the judged assistant turn last."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an RM scores a conversation that ends with an assistant turn")
    return human_assistant(messages, add_generation_prompt=False)


def classifier_config(model_dir: str | Path):
    """The RM's config: the base LM's with one output and the tokenizer's pad id (every rank builds the same)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, num_labels=1, trust_remote_code=False)
    config.pad_token_id = load_tokenizer(model_dir).pad_token_id  # the same id whichever side pads
    return config


def empty_classifier(config):
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return expose_token_scores(AutoModelForSequenceClassification.from_config(config))


def expose_token_scores(model):
    """Make `model(...).logits` the score head's output at every token, `[B, T, 1]`, not one pooled score.

    A `*ForSequenceClassification` pools its score at the last non-pad token of each row, which is one
    score for a packed row of many conversations; `micro_loss` picks each conversation's last token
    itself. The head's output is captured by a forward hook and put in the model's output by a forward
    hook on the model, registered before FSDP2 shards it: FSDP2's own post-forward hook runs after ours,
    sees the per-token scores as the module's output and arms its backward hooks on them (a score read
    from inside the forward would reach the head's weights after FSDP2 had freed them). Hooks are not
    saved: the training loop writes a plain sequence classifier.
    """
    captured: list[torch.Tensor] = []
    model.score.register_forward_hook(lambda module, args, out: captured.append(out))

    def token_scores(module, args, output):
        output.logits = captured.pop()
        return output

    model.register_forward_hook(token_scores)
    return model


def load_classifier(ref: str, dtype: str = "auto", device: str = "cpu"):
    """An RM as a one-output sequence classifier (a base LM's fresh head drawn from a fixed seed, so it is the
    same in every replica and run), with its tokenizer's pad id."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_dir(str(ref))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch_dtype(dtype, device), trust_remote_code=False
        )
    model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


class RewardModel:
    """One RM on one device. `ref` is any model reference (an RM trained by `train-rm`, or a base LM
    whose fresh head is random, which is only useful in tests); `model`, when given, is that RM already
    loaded (PPO's sharded reward role passes its FSDP2 model)."""

    def __init__(
        self, ref: str, dtype: str = "auto", device: str | None = None, max_length: int = 1024, batch_size: int = 8,
        model=None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model_dir(ref)
        # left truncation keeps the judged answer when a dialogue is too long
        self.tokenizer = load_tokenizer(path, padding_side="right", truncation_side="left")
        self.model = model if model is not None else load_classifier(path, dtype, self.device).to(self.device)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.config.use_cache = False  # a forward would otherwise keep every layer's keys and values
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()  # not inference_mode: a sharded RM's all-gathered weights are reused across calls
    def score_texts(self, texts: list[str], passes: int | None = None) -> list[float]:
        """Scores of `texts` in batches of `batch_size` (sorted by length, so a batch pads little). `passes`:
        run at least this many forward passes (empty ones at the end), as every replica of a sharded RM must
        run the same number."""
        scores = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(order), self.batch_size)
        for start in starts:
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length, add_special_tokens=False,
            ).to(self.device)
            out = self.model(**enc).logits[:, 0].float().tolist()
            for i, s in zip(idx, out):
                scores[i] = s
        for _ in range(len(starts), passes or 0):
            self.model(**self.tokenizer(["."], return_tensors="pt", add_special_tokens=False).to(self.device))
        return scores

    def score(self, conversations: list[Messages], passes: int | None = None) -> list[float]:
        """Scores of conversations that each end with the assistant turn being judged."""
        return self.score_texts([rm_text(m) for m in conversations], passes)


def score_conversations(rm: RewardModel, batch: pd.DataFrame) -> pd.DataFrame:
    """Add `reward`: the RM's score of each row's `conversation` (a JSON string), as a pool replica answers."""
    return batch.assign(reward=rm.score([json.loads(c) for c in batch["conversation"]]))
