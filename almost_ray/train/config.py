"""Settings of the training loop (`train/loop.py`) and its tasks, `train-rm`, `train-sft` and `train-dpo`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from almost_ray.config_base import StageSection, StrictModel


class TrainConfig(StrictModel):
    """The training loop shared by every training stage (`almost_ray/train/loop.py`).

    `global_batch_size` is what one optimizer step sees, whatever `num_workers` is: each worker runs
    `micro_batch_size` examples per forward pass and accumulates gradients until the global batch is
    done. `num_workers: 0` runs the loop in the driver process without Ray workers or FSDP (debugging).
    """

    model: str = Field(default="embedded:smollm2-135m-instruct", description="base model reference")
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    global_batch_size: int = Field(default=64, ge=1, description="examples (RM: pairs) per optimizer step")
    micro_batch_size: int = Field(default=8, ge=1, description="examples per forward pass on one worker")
    max_length: int = Field(default=1024, ge=8, description="tokens per sequence (longer ones are truncated)")
    lr: float = Field(default=1e-5, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="share of steps with linear warm-up")
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="gradient clipping; null: none")
    seed: int = 0
    gradient_checkpointing: bool = False
    padding_free: bool = Field(
        default=True, description="pack each micro-batch into one row (no pad tokens; models/packing.py), as TRL's "
        "padding_free; false: right-padded batches")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="compute dtype; the master weights and AdamW state are always fp32 (FSDP2's "
        "MixedPrecisionPolicy when sharded, autocast otherwise). auto: bf16 on GPU, fp32 on CPU"
    )
    save_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="dtype of the final model's HF directory (checkpoints keep fp32 master weights)"
    )
    reshard_after_forward: bool = Field(
        default=True, description="FSDP2: free gathered weights after forward (less memory, more traffic)"
    )
    checkpoint_every: int = Field(default=100, ge=1, description="optimizer steps between checkpoints")
    checkpoints_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts from the last checkpoint")
    num_workers: int = Field(default=2, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, ge=0, description="with use_gpu")
    storage_path: Path | None = Field(
        default=None, description="Ray Train checkpoints (shared storage on a cluster); null: <stage dir>/ray"
    )


    @model_validator(mode="after")
    def _whole_gpus_per_worker(self) -> TrainConfig:
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker: {self.gpus_per_worker:g}: the {self.num_workers} workers form one NCCL group and "
                "Ray may give two of them one GPU, which NCCL refuses; give each worker whole GPUs")
        return self


class TrainRMConfig(TrainConfig, StageSection):
    """`almost-ray train-rm`: reward model (ALMoST Section 2.1, Appendix D.1: 1 epoch, lr 1e-5, batch 64,
    max length 1024). The text of a conversation is `models.reward.rm_text`, as `RewardModel` scores it."""

    comparisons: str | None = Field(
        default=None, description="comparisons to train on (any source form, docs/pipeline.md); null: the compare "
        "stage's comparisons.jsonl")

    heldout_fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="share of queries whose comparisons are held out of training (a stable hash of the query "
        "decides) and written to <stage dir>/heldout_comparisons.jsonl for eval_rm; 0: train on all",
    )


class TrainDPOConfig(TrainConfig, StageSection):
    """`almost-ray train-dpo`: direct preference optimisation of the SFT model on comparisons (Rafailov et al.
    2023), against a frozen reference whose log-probabilities are computed once before training (TRL's
    `precompute_ref_log_probs`). Defaults are TRL 1.16 `DPOConfig`'s and the DPO paper's (beta 0.1, lr 1e-6,
    batch 64); `ipo` (Azar et al. 2023) and `simpo` (Meng et al. 2024, reference-free) are loss options.
    `model` is the policy's starting point, normally the SFT model."""

    model: str | None = Field(default=None, description="the starting policy; null: train_sft's model")
    comparisons: str | None = Field(
        default=None, description="preference pairs (any source form); null: the compare stage's comparisons.jsonl")
    reference: str | None = Field(
        default=None, description="the frozen reference model; null: the starting model (`model`), as in DPO")
    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field(
        default="sigmoid", description="sigmoid: DPO; ipo: IPO (log-ratios averaged per token, as TRL); simpo: SimPO")
    beta: float = Field(
        default=0.1, gt=0, description="DPO's beta (TRL: 0.1); IPO's tau; SimPO's beta (its paper: 2 to 2.5)")
    simpo_gamma: float = Field(default=0.5, ge=0, description="SimPO's target margin gamma (TRL CPOConfig: 0.5)")
    prompt_format: Literal["human_assistant", "tulu"] = Field(
        default="human_assistant", description="the format the SFT model was trained on (train_sft.prompt_format)")
    lr: float = Field(default=1e-6, gt=0)
    global_batch_size: int = Field(default=64, ge=1, description="pairs per optimizer step")


SFTMode = Literal["sft", "response_tuning", "single_task"]
# Hewitt et al. Appendix A: lr 1e-5, cosine to 0, 10 % warm-up, batch 64 (epochs swept: 5..20).
_HEWITT_DEFAULTS = {"lr": 1e-5, "warmup_ratio": 0.1, "global_batch_size": 64, "prompt_format": "tulu"}


class TrainSFTConfig(TrainConfig, StageSection):
    """`almost-ray train-sft`: supervised finetuning, loss on assistant tokens only.

    `mode: sft` is ALMoST's SFT (Section 2.2, Appendix D.2 after Alpaca: lr 2e-5, batch 128, max length
    512, 3 epochs, Human:/Assistant: prefixes). `response_tuning` and `single_task` are Hewitt et al.'s
    Sections 4 and 5: the same path, Tulu format, the instruction emptied for response tuning; fields
    you leave unset take their defaults (lr 1e-5, 10 % warm-up, batch 64).
    """

    mode: SFTMode = "sft"
    dialogues: str | None = Field(
        default=None, description="dialogues or prompt-completion rows (any source form); null: the rmsp stage's "
        "dialogues.jsonl")
    prompt_format: Literal["human_assistant", "tulu"] = Field(
        default="human_assistant", description="sft: human_assistant; Hewitt et al.'s modes: tulu"
    )
    lr: float = Field(default=2e-5, gt=0)
    global_batch_size: int = Field(default=128, ge=1)
    max_length: int = Field(default=512, ge=8)
    epochs: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _mode_defaults(self) -> TrainSFTConfig:
        if self.mode != "sft":
            for name, value in _HEWITT_DEFAULTS.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self
