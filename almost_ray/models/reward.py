"""Reward-model scoring: a sequence classifier with one output, r(conversation) -> float.

The RM reads a conversation rendered in the papers' `Human:`/`Assistant:` format, ending with the
assistant turn being judged, and its score is the head's output at the last non-pad token (how
transformers' `*ForSequenceClassification` pools). `score_conversations` is what a pool's replica
(`cluster.replicas.ModelReplica` holding one RM) does with a batch: the As-is filter of step 1, eval_rm and
the eval suites scored by an RM use the same pool.
"""

from __future__ import annotations

import json

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


class RewardModel:
    """One RM on one device. `ref` is any model reference (an RM trained by `train-rm`, or a base LM
    whose fresh head is random, which is only useful in tests)."""

    def __init__(
        self, ref: str, dtype: str = "auto", device: str | None = None, max_length: int = 1024, batch_size: int = 8
    ):
        from transformers import AutoModelForSequenceClassification

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model_dir(ref)
        # left truncation keeps the judged answer when a dialogue is too long
        self.tokenizer = load_tokenizer(path, padding_side="right", truncation_side="left")
        with torch.random.fork_rng(devices=[]):  # a base LM's fresh head is the same in every replica and run
            torch.manual_seed(0)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch_dtype(dtype, self.device), trust_remote_code=False
            )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.inference_mode()
    def score_texts(self, texts: list[str]) -> list[float]:
        scores = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length, add_special_tokens=False,
            ).to(self.device)
            out = self.model(**enc).logits[:, 0].float().tolist()
            for i, s in zip(idx, out):
                scores[i] = s
        return scores

    def score(self, conversations: list[Messages]) -> list[float]:
        """Scores of conversations that each end with the assistant turn being judged."""
        return self.score_texts([rm_text(m) for m in conversations])


def score_conversations(rm: RewardModel, batch: pd.DataFrame) -> pd.DataFrame:
    """Add `reward`: the RM's score of each row's `conversation` (a JSON string), as a pool replica answers."""
    return batch.assign(reward=rm.score([json.loads(c) for c in batch["conversation"]]))
