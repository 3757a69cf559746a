"""The `train_rm` stage (`almost-ray train-rm`): the reward model of ALMoST Section 2.1 (Appendix D.1), on `loop.py`.

A sequence classifier with one output on the base LM scores a conversation that ends with the
judged reply; the loss is −log σ(r(x, y_chosen) − r(x, y_rejected)). Text and tokenization are
exactly those of `models.reward.RewardModel` (`rm_text`, no special tokens, left truncation, score
at the last token), so the trained RM is scored the way it was trained.

This module is also the RM *task* of the loop: `load_config`, `load_model`, `empty_model`, `load_tokenizer`,
`length`, `units`, `micro_loss`, `step_metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from almost_ray.config import Config
from almost_ray.data.preferences import PreferencePair, load_pairs, split_by_query
from almost_ray.data.sources import require
from almost_ray.models import loading
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.packing import pack_pairs, shares_prefixes
from almost_ray.models.reward import classifier_config, empty_classifier, expose_token_scores, rm_text
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage
from almost_ray.train import loop
from almost_ray.train.data import pad_batch
from almost_ray.train.losses import pairwise_loss, pairwise_stats

TRAIN_SPLIT = "train_comparisons.jsonl"  # with train_rm.heldout_fraction > 0; the rest: paths.rm_heldout_file


def load_tokenizer(model_dir: str | Path):
    """`models.loading.load_tokenizer` as `RewardModel` uses it: right padding, left truncation."""
    return loading.load_tokenizer(model_dir, padding_side="right", truncation_side="left")


# the RM task's model: the sequence classifier of `models/reward.py`, scoring every token
load_config = classifier_config
empty_model = empty_classifier


def load_model(model_dir: str | Path):
    """The base LM with a fresh one-output head (transformers' `*ForSequenceClassification`), scoring every
    token (`models.reward.expose_token_scores`)."""
    from transformers import AutoModelForSequenceClassification

    return expose_token_scores(AutoModelForSequenceClassification.from_pretrained(
        model_dir, config=classifier_config(model_dir), dtype=torch.float32, trust_remote_code=False
    ))


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_length: int) -> list[dict]:
    """Token ids of both conversations of every pair (int32 arrays, compact to ship to workers)."""
    texts = [rm_text(p.chosen) for p in pairs] + [rm_text(p.rejected) for p in pairs]
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    n = len(pairs)
    return [
        {"chosen": np.asarray(ids[i], dtype=np.int32), "rejected": np.asarray(ids[n + i], dtype=np.int32)}
        for i in range(n)
    ]


def length(example: dict) -> int:
    return max(len(example["chosen"]), len(example["rejected"]))


def units(example: dict) -> int:
    return 1  # the RM loss is a mean over pairs


def micro_loss(model, rows: list[dict], device: torch.device,
               padding_free: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Both replies of every pair in one forward pass; returns the summed loss and summed stats.

    Each reward is the score at its conversation's last token (the model scores every token:
    `expose_token_scores`); padding-free, the 2 x len(rows) conversations are one packed row
    (`models.packing`) and no layer computes a pad token, and where the attention allows it
    (`shares_prefixes`) the part of a pair's two conversations before they differ is computed once.
    """
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    if padding_free:
        # both scores read the same prefix: laid down once, the same rewards for less arithmetic
        row = pack_pairs([(r["chosen"], r["rejected"]) for r in rows], shares_prefixes(model))
        scores = model(input_ids=row.input_ids.to(device), **row.attention_kwargs(device)).logits[0, :, 0]
        rewards = scores[row.ends.to(device)]
    else:
        input_ids = pad_batch(seqs, model.config.pad_token_id).to(device)
        lens = torch.tensor([len(s) for s in seqs], device=device)
        attention_mask = (torch.arange(input_ids.size(1), device=device)[None, :] < lens[:, None]).long()
        scores = model(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0]
        rewards = scores[torch.arange(len(seqs), device=device), lens - 1]  # right padding: the last real token
    chosen, rejected = rewards[: len(rows)], rewards[len(rows) :]
    stats = pairwise_stats(chosen, rejected)
    stats["reward"] = chosen.detach().float().sum() + rejected.detach().float().sum()
    return pairwise_loss(chosen, rejected).sum(), stats


def step_metrics(totals: dict[str, float], units: int, samples: int) -> dict[str, float]:
    return {
        "loss": totals["loss"] / units,
        "accuracy": totals["accuracy"] / units,
        "margin": totals["margin"] / units,
        "mean_reward": totals["reward"] / (2 * units),
    }


def check(cfg: Config) -> None:
    """Every comparison row, and the base model, before Ray starts or a model is converted."""
    require(paths.train_rm_comparisons(cfg), "train_rm.comparisons", None if cfg.train_rm.comparisons else "compare")
    load_pairs(paths.train_rm_comparisons(cfg))
    check_model_ref(cfg.train_rm.model, "train_rm.model")


def work(cfg: Config) -> Outcome:
    """Hold out `heldout_fraction` of the queries, encode the pairs and train the RM into `<stage>/model`."""
    t = cfg.train_rm
    stage_dir = paths.stage_dir(cfg, "train_rm")
    loop.start_workers(cfg, "train_rm")
    model_dir = resolve_model_dir(t.model)
    source, counts = paths.train_rm_comparisons(cfg), {}
    train_path = source
    if t.heldout_fraction > 0:  # eval_rm measures the RM on queries it never trained on
        train_path = stage_dir / TRAIN_SPLIT
        _, counts["heldout_pairs"] = split_by_query(source, t.heldout_fraction, train_path, paths.rm_heldout_file(cfg))
    pairs = load_pairs(train_path)
    examples = encode_pairs(pairs, load_tokenizer(model_dir), t.max_length)
    metrics = loop.train_and_plot("rm", t, examples, model_dir, stage_dir, ["loss", "accuracy"], "reward model")
    return Outcome(counts={"pairs": len(pairs), **counts}, metrics=metrics)


STAGE = Stage(
    "train_rm", "the reward model on the comparisons (Ray Train, FSDP)",
    section=lambda c: c.train_rm,
    inputs=lambda c: {"comparisons": paths.train_rm_comparisons(c)},
    outputs=lambda c: {"model": paths.rm_model(c), **({"heldout": h} if (h := paths.rm_heldout_file(c)) else {})},
    work=work, check=check,
    headline=("counts.*", "metrics.steps", "metrics.final_loss", "metrics.tail_accuracy"),
)


def run(cfg: Config) -> Path:
    """Train the RM into `<run dir>/rm/model`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)
