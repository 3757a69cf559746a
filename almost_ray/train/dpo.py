"""The `train_dpo` stage (`almost-ray train-dpo`): direct preference optimisation on comparisons (Rafailov et al. 2023), on `loop.py`.

The policy starts from the SFT model and learns from preference pairs directly, with no reward model and
no rollouts: the loss (`losses.preference_loss`: DPO's sigmoid, IPO or SimPO) compares how much more
likely the policy makes the chosen reply than the rejected one, relative to a frozen reference (the SFT
model). The reference never changes, so its log-probability of every reply is computed ONCE, before
training, and stored with the examples (TRL's `precompute_ref_log_probs`): training holds one model, and
`<stage dir>/reference_logps.safetensors` keeps them for a resumed run.

Input: `compare`'s comparisons or any TRL-format preference file (`data/preferences.py`). A pair is
rendered as SFT renders a dialogue (`sft.render`, Human:/Assistant: or Tulu, EOS after the reply): the
context is the prompt, the judged reply and its EOS are the completion whose tokens are scored. A pair
whose prompt alone fills `max_length` is dropped (TRL drops it too); longer completions are cut on the right.

This module is also the DPO *task* of the loop: `load_config`, `load_model`, `empty_model`,
`load_tokenizer` (those of SFT: the policy is a causal LM), `length`, `units`, `micro_loss`, `step_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from almost_ray.config import Config
from almost_ray.data.atomic import atomic_open
from almost_ray.data.preferences import PreferencePair, load_pairs
from almost_ray.data.records import RecordError
from almost_ray.data.sources import require
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.packing import pack_pairs, shares_prefixes, use_packed_attention
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage
from almost_ray.train import loop
from almost_ray.train.config import TrainDPOConfig
from almost_ray.train.data import encode_supervised, pad_batch
from almost_ray.train.losses import IGNORE_INDEX, preference_loss, preference_stats
from almost_ray.train.sft import empty_model, load_config, load_model, load_tokenizer, render

__all__ = ["empty_model", "load_config", "load_model", "load_tokenizer", "length", "units", "micro_loss",
           "step_metrics", "STAGE", "run"]
REFERENCE_LOGPS = "reference_logps.safetensors"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


# ---------------------------------------------------------------------------------------------- examples
def encode_reply(tokenizer, pair_side: list[dict[str, str]], prompt_format: str, max_length: int
                 ) -> tuple[np.ndarray, int] | None:
    """Token ids of one conversation and where its last reply (with EOS) starts; None when truncation
    leaves no token of the reply."""
    text, spans = render(pair_side, prompt_format)
    encoded = encode_supervised(tokenizer, text, spans[-1:], max_length, eos_supervised=True)
    scored = np.flatnonzero(encoded["labels"] != IGNORE_INDEX)
    if len(scored) == 0 or scored[0] == 0:
        return None
    return encoded["input_ids"], int(scored[0])


def encode_pairs(pairs: list[PreferencePair], tokenizer, cfg: TrainDPOConfig) -> list[dict]:
    """Both conversations of every pair as token ids with the start of the scored reply; pairs that keep
    no reply token within `max_length` are dropped."""
    examples = []
    for pair in pairs:
        chosen = encode_reply(tokenizer, pair.chosen, cfg.prompt_format, cfg.max_length)
        rejected = encode_reply(tokenizer, pair.rejected, cfg.prompt_format, cfg.max_length)
        if chosen is None or rejected is None:
            continue
        examples.append({"chosen": chosen[0], "chosen_start": chosen[1],
                         "rejected": rejected[0], "rejected_start": rejected[1]})
    return examples


# ---------------------------------------------------------------------------------------------- the task
def length(example: dict) -> int:
    return len(example["chosen"]) + len(example["rejected"])  # both sides run in one forward pass


def units(example: dict) -> int:
    return 1  # the loss is a mean over pairs


def reply_logps(model, rows: list[dict], device: torch.device, padding_free: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(reply | prompt), summed over each reply's tokens, and the reply's token count, for the chosen
    conversations of `rows` then the rejected ones (`[2 * len(rows)]` each), in one forward pass.

    The vocabulary projection runs only at the positions that predict a reply token (`logits_to_keep`).
    Padding-free, all conversations are one packed row (`models.packing`) and no pad token is computed;
    where the attention allows it (`shares_prefixes`) a pair's two conversations lay down the tokens they
    share (the prompt, at least) once (prefix sharing, Wang et al. 2024, "Accelerating Direct Preference
    Optimization with Prefix Sharing"): a shared position that predicts a reply token of both (the prompt's
    last) is projected once and read for each reply's own next token.
    """
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    starts = [r["chosen_start"] for r in rows] + [r["rejected_start"] for r in rows]
    if padding_free:
        row = pack_pairs([(r["chosen"], r["rejected"]) for r in rows], shares_prefixes(model))
        where = row.token_rows()  # as `seqs`: all chosen, then all rejected
        inputs = {"input_ids": row.input_ids.to(device), **row.attention_kwargs(device)}
        # position t of a conversation predicts its token t + 1: the reply's tokens, from the prompt's last
        predict = torch.from_numpy(np.concatenate([w[start - 1 : len(s) - 1] for w, s, start in zip(where, seqs, starts)]))
        keep = torch.zeros(row.input_ids.shape, dtype=torch.bool)
        keep[0, predict] = True
        at = (keep[0].cumsum(0) - 1)[predict]  # each prediction's place among the projected positions
        wanted = torch.from_numpy(np.concatenate([s[start:] for s, start in zip(seqs, starts)]).astype(np.int64))
        index = torch.from_numpy(np.concatenate([np.full(len(s) - start, i) for i, (s, start) in
                                                 enumerate(zip(seqs, starts))]))
    else:
        labels = [np.where(np.arange(len(s)) >= start, s, IGNORE_INDEX) for s, start in zip(seqs, starts)]
        owner = [np.full(len(s), i) for i, s in enumerate(seqs)]  # which conversation each position belongs to
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        input_ids = pad_batch(seqs, pad).to(device)
        lens = torch.tensor([len(s) for s in seqs], device=device)
        attention_mask = (torch.arange(input_ids.size(1), device=device)[None, :] < lens[:, None]).long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        label_rows = pad_batch(labels, IGNORE_INDEX)
        targets = torch.full_like(label_rows, IGNORE_INDEX)  # position t predicts token t+1 of its conversation
        targets[:, :-1] = label_rows[:, 1:]
        keep = targets != IGNORE_INDEX
        at, wanted, index = torch.arange(int(keep.sum())), targets[keep], pad_batch(owner, 0)[keep]
    logits = model(**inputs, logits_to_keep=keep.to(device)).logits
    logprobs = torch.log_softmax(logits.reshape(-1, logits.size(-1)).float(), dim=-1)
    token_logps = logprobs[at.to(device), wanted.to(device)]
    index = index.to(device)
    logps = torch.zeros(len(seqs), device=device).index_add(0, index, token_logps)
    tokens = torch.zeros(len(seqs), device=device).index_add(0, index, torch.ones_like(token_logps))
    return logps, tokens


def micro_loss(model, rows: list[dict], device: torch.device, padding_free: bool = False, *,
               loss_type: str = "sigmoid", beta: float = 0.1, simpo_gamma: float = 0.5
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed preference loss of `rows` and the sums of TRL's metrics; the reference's log-probs are
    the ones stored in each row (`ref_chosen`, `ref_rejected`)."""
    logps, tokens = reply_logps(model, rows, device, padding_free)
    n = len(rows)
    reference = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows], device=device)
    loss, chosen_rewards, rejected_rewards = preference_loss(
        loss_type, logps[:n], logps[n:], reference[:, 0], reference[:, 1], tokens[:n], tokens[n:], beta, simpo_gamma)
    stats = preference_stats(loss, chosen_rewards, rejected_rewards)
    stats["logps/chosen"] = logps[:n].detach().sum()
    stats["logps/rejected"] = logps[n:].detach().sum()
    return loss.sum(), stats


def step_metrics(totals: dict[str, float], units: int, samples: int) -> dict[str, float]:
    return {key: totals[key] / units for key in METRICS}


# ---------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_logps(reference_dir: str | Path, examples: list[dict], cfg: TrainDPOConfig, device: str = "cpu"
                    ) -> np.ndarray:
    """log pi_ref of every chosen and rejected reply, `[len(examples), 2]` float64: the reference model's
    forward over the examples in micro-batches, in the compute precision of training (bf16 on GPU with
    `mixed_precision: auto`) and the same padding-free layout."""
    model = load_model(reference_dir).to(device).eval()
    model.config.use_cache = False
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device == "cuda")
    if cfg.padding_free:
        use_packed_attention(model, flash=bf16 and device == "cuda")
    out = np.zeros((len(examples), 2), dtype=np.float64)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    for start in range(0, len(examples), cfg.micro_batch_size):
        rows = examples[start : start + cfg.micro_batch_size]
        with autocast:
            logps, _ = reply_logps(model, rows, torch.device(device), cfg.padding_free)
        logps = logps.double().cpu().numpy()
        out[start : start + len(rows), 0] = logps[: len(rows)]
        out[start : start + len(rows), 1] = logps[len(rows) :]
    return out


def _reference_key(reference_dir: Path, examples: list[dict], cfg: TrainDPOConfig) -> str:
    """What the stored reference log-probs depend on: the reference's weight files, the token ids, and
    the settings that change the forward pass."""
    h = hashlib.sha256()
    for weights in sorted(reference_dir.glob("*.safetensors")):
        stat = weights.stat()
        h.update(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(json.dumps([cfg.mixed_precision, cfg.padding_free, cfg.use_gpu]).encode())
    for ex in examples:
        for key in ("chosen", "chosen_start", "rejected", "rejected_start"):
            h.update(np.asarray(ex[key]).tobytes())
    return h.hexdigest()


def attach_reference_logps(examples: list[dict], reference_dir: Path, cfg: TrainDPOConfig, stage_dir: Path) -> None:
    """Store `ref_chosen` and `ref_rejected` in every example: read from `stage_dir/reference_logps.safetensors`
    when it was written for these examples and this reference, else computed (in a Ray task when
    `num_workers > 0`: on one worker's GPU, or on the CPUs of the whole worker group, idle until training
    starts; in this process otherwise) and written atomically.

    A resumed run thus trains on exactly the numbers the interrupted one did (a recomputation on a GPU may
    differ in the last bits, and the Ray Train run is named after the examples)."""
    from safetensors import safe_open
    from safetensors.torch import save

    path = stage_dir / REFERENCE_LOGPS
    key = _reference_key(reference_dir, examples, cfg)
    table = None
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                table = f.get_tensor("logps").numpy()
    if table is None:
        table = _compute_reference_logps(reference_dir, examples, cfg)
        with atomic_open(path, "wb") as f:
            f.write(save({"logps": torch.tensor(table)}, metadata={"key": key}))
    for ex, (chosen, rejected) in zip(examples, table.tolist()):
        ex["ref_chosen"], ex["ref_rejected"] = chosen, rejected


def _compute_reference_logps(reference_dir: Path, examples: list[dict], cfg: TrainDPOConfig) -> np.ndarray:
    if cfg.num_workers == 0:
        return reference_logps(reference_dir, examples, cfg, "cuda" if cfg.use_gpu and torch.cuda.is_available()
                               else "cpu")
    import ray

    gpus = cfg.gpus_per_worker if cfg.use_gpu else 0
    # the pass runs before the worker group starts, so on CPU it may take all the CPUs the group will hold
    cpus = cfg.cpus_per_worker if gpus > 0 else cfg.cpus_per_worker * cfg.num_workers

    def in_worker(reference_dir, examples, cfg):
        torch.set_num_threads(max(1, int(cpus)))
        return reference_logps(reference_dir, examples, cfg, "cuda" if gpus > 0 else "cpu")

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(in_worker)
    return ray.get(task.remote(reference_dir, examples, cfg))


# ---------------------------------------------------------------------------------------------- the stage
def check(cfg: Config) -> None:
    """Every pair, the starting policy and the reference, before Ray starts or a model is converted."""
    t = cfg.train_dpo
    require(paths.train_dpo_comparisons(cfg), "train_dpo.comparisons", None if t.comparisons else "compare")
    load_pairs(paths.train_dpo_comparisons(cfg))
    check_model_ref(paths.train_dpo_policy(cfg), "train_dpo.model", made_by=None if t.model else "train-sft")
    if t.reference:
        check_model_ref(t.reference, "train_dpo.reference")


def work(cfg: Config) -> Outcome:
    """Encode the pairs, attach the reference's log-probs (computed once, stored) and train into `<stage>/model`."""
    t = cfg.train_dpo.model_copy(update={"model": paths.train_dpo_policy(cfg)})
    stage_dir, source = paths.stage_dir(cfg, "train_dpo"), paths.train_dpo_comparisons(cfg)
    loop.start_workers(cfg, "train_dpo", t)
    model_dir = resolve_model_dir(t.model)
    pairs = load_pairs(source)
    examples = encode_pairs(pairs, load_tokenizer(model_dir), t)
    if not examples:
        raise RecordError(f"{source}: no pair keeps a reply token within train_dpo.max_length={t.max_length}")
    started = time.perf_counter()
    if t.loss_type == "simpo":  # reference-free
        for ex in examples:
            ex["ref_chosen"] = ex["ref_rejected"] = 0.0
    else:
        reference_dir = resolve_model_dir(t.reference) if t.reference else model_dir
        attach_reference_logps(examples, reference_dir, t, stage_dir)
    reference_s = time.perf_counter() - started  # read from disk when stored: near 0 on a resumed run
    options = {"loss_type": t.loss_type, "beta": t.beta, "simpo_gamma": t.simpo_gamma}
    metrics = loop.train_and_plot("dpo", t, examples, model_dir, stage_dir,
                                  ["loss", "rewards/accuracies", "rewards/margins"], f"DPO ({t.loss_type})",
                                  loss_options=options)
    return Outcome(counts={"pairs": len(pairs), "trained": len(examples)},
                   metrics={**metrics, "reference_logps_s": round(reference_s, 3)})


def _inputs(cfg: Config) -> dict[str, Path | str]:
    policy = paths.local_model_path(paths.train_dpo_policy(cfg))
    return {"comparisons": paths.train_dpo_comparisons(cfg), **({"policy": policy} if policy else {})}


STAGE = Stage(
    "train_dpo", "DPO on the synthetic comparisons, from the SFT model (beyond ALMoST: no RM, no rollouts)",
    section=lambda c: c.train_dpo, inputs=_inputs,
    outputs=lambda c: {"model": paths.dpo_model(c)},
    work=work, check=check,
    headline=("counts.*", "metrics.steps", "metrics.final_loss", "metrics.tail_rewards_accuracies"),
)


def run(cfg: Config) -> Path:
    """DPO into `<run dir>/dpo/model`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)
