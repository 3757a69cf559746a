"""Settings of `almost-ray ppo` (ALMoST step 3, RLSF): PPO against the synthetic RM.

The defaults are the paper's (Section 2.3, Appendix D.3): policy from the SFT model, prompts the first
user turns of the RMSP dialogues, reward = RM score at the last response token minus lambda * KL to the
SFT policy (lambda 0.05), 512 episodes per iteration in minibatches of 32, 4 inner epochs, at most 128 new
tokens, temperature 1, clip 0.2, gamma 1, AdamW lr 1e-6 with betas (0.9, 0.95) and cosine decay to 8e-7,
no reward normalisation, 80k episodes. `configs/demo.yaml` shrinks the sizes for 2 CPUs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from almost_ray.config_base import StageSection, StrictModel
from almost_ray.rl.openrlhf_config import OpenRLHFConfig

Role = Literal["policy", "critic", "reference", "reward"]
ROLES: tuple[Role, ...] = ("policy", "critic", "reference", "reward")
AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
CriticFreeEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # the baseline is the other responses to the same prompt
GROUP_SIZE_DEFAULT = 4  # n_samples_per_prompt of a group estimator when the config leaves it unset


class RoleResources(StrictModel):
    """One role's actor group: `replicas` actors, each reserving `num_cpus`/`num_gpus`.

    Trainable roles (policy, critic) are data-parallel across their replicas; frozen roles split the
    rollout batch between theirs. Colocated roles share bundles, so their fractions must add up to at
    most one bundle (OpenRLHF places colocated roles with fractional `num_gpus` the same way).
    """

    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)


class RolloutConfig(StrictModel):
    """The rollout engines: actors that only generate, refreshed with the policy's weights each iteration.

    `backend: hf` is the HF generator (CPU, or one GPU), in the roles' placement group; `vllm` is vLLM engines
    (`[gpu]` extra), each in a placement group of its own of `tensor_parallel_size` one-GPU bundles (so
    `num_cpus` is per bundle and `num_gpus` is 1, or 0 to leave it to that rule), whose weights are refreshed
    by NCCL broadcast. Colocation with the policy (CUDA IPC, vLLM sleep/wake) is not implemented.
    """

    backend: Literal["auto", "hf", "vllm"] = "auto"
    engines: int = Field(default=1, ge=1, description="rollout engine actors")
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM")
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1, description="vLLM: its share of each of its GPUs")
    max_batch_size: int = Field(default=16, ge=1, description="HF backend: prompts per forward pass")
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads of each HF engine; null: its num_cpus rounded up. The rollout phase runs "
        "alone, so on a small machine the engine may use every core while the roles keep `ppo.torch_threads`",
    )


class PPOConfig(StageSection):
    """`almost-ray ppo`: one iteration = rollout of `rollout_batch_size` episodes (one prompt, one
    sampled response each; `n_samples_per_prompt` responses share a prompt), scoring by reference/reward
    (and the critic with `advantage_estimator: gae`), then `ppo_epochs` passes over the episodes in
    minibatches of `minibatch_size` (one optimizer step per minibatch).

    `advantage_estimator` other than `gae` is critic-free (rl/losses.py): no critic role is planned,
    placed or started, and the critic's settings are unused.
    """

    policy: str | None = Field(default=None, description="SFT model reference; null: train_sft's model (<run dir>/<train_sft.mode>/model)")
    reward_model: str | None = Field(default=None, description="RM reference; null: <run dir>/rm/model")
    critic_init: Literal["reward", "policy"] = Field(
        default="reward", description="critic starts from the RM (OpenRLHF's default) or from the SFT model"
    )
    prompts: str | None = Field(
        default=None,
        description="prompts (a .txt, one per line, or rows with messages/prompt/text in any source form); null: "
        "the first user turns of the rmsp stage's dialogues",
    )
    prompt_format: Literal["human_assistant", "tulu", "chat"] = Field(
        default="human_assistant", description="the format the SFT model was trained on"
    )
    max_prompt_tokens: int = Field(default=512, ge=8, description="longer prompts are dropped and counted")
    # ALMoST Appendix D.3
    total_episodes: int = Field(default=80_000, ge=1, description="paper: 80k episodes over 20k prompts")
    rollout_batch_size: int = Field(default=512, ge=1, description="episodes per iteration (paper: 512)")
    minibatch_size: int = Field(default=32, ge=1, description="episodes per optimizer step (paper: 32)")
    micro_batch_size: int = Field(default=8, ge=1, description="episodes per forward pass on one replica")
    padding_free: bool = Field(
        default=True, description="a micro-batch's episodes end to end in one row, no pad tokens (models/packing.py; "
        "OpenRLHF --ds.packing_samples); false: right-padded rows")
    ppo_epochs: int = Field(default=4, ge=1, description="passes over each rollout batch (paper: 4)")
    advantage_estimator: AdvantageEstimator = Field(
        default="gae",
        description="gae: a critic's values (the paper's PPO); critic-free: grpo (group-normalised scores), dr_grpo "
        "(group mean only), rloo (leave-one-out group mean), reinforce_pp (REINFORCE++: returns normalised over the "
        "batch). OpenRLHF's gae, group_norm, dr_grpo, rloo, reinforce",
    )
    n_samples_per_prompt: int = Field(
        default=1, ge=1,
        description="responses sampled per prompt (a group); rollout_batch_size counts responses. grpo, dr_grpo "
        f"and rloo need 2 or more (default {GROUP_SIZE_DEFAULT} with them)",
    )
    max_new_tokens: int = Field(default=128, ge=1, description="paper: 128")
    temperature: float = Field(default=1.0, gt=0, description="paper: 1")
    top_p: float = Field(default=1.0, gt=0, le=1)
    kl_coef: float = Field(default=0.05, ge=0, description="lambda of r - lambda * KL (paper: 0.05)")
    kl_estimator: Literal["k1", "k3"] = Field(
        default="k1", description="k1 (the paper's, as a reward penalty) or k3 (GRPO's, as a loss term)")
    use_kl_loss: bool = Field(
        default=False,
        description="the KL to the reference as kl_coef * KL in the policy loss (GRPO; OpenRLHF --algo.kl.use_loss) "
        "instead of -kl_coef * KL in the rewards",
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="paper: 1")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(default=0.2, gt=0, description="policy ratio clip (paper: 0.2)")
    clip_range_value: float = Field(default=0.2, gt=0, description="value clip")
    value_loss_coef: float = Field(default=0.1, ge=0)
    whiten_advantages: bool = Field(
        default=True, description="gae only: grpo, dr_grpo and rloo are never whitened again, reinforce_pp always is")
    missing_eos_penalty: float | None = Field(
        default=None, description="added to the RM score of a response cut at max_new_tokens without EOS"
    )
    lr: float = Field(default=1e-6, gt=0, description="policy AdamW lr (paper: 1e-6)")
    min_lr: float = Field(default=8e-7, ge=0, description="cosine decays to this (paper: 8e-7)")
    critic_lr: float = Field(default=1e-6, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="the compute dtype: the engines and the frozen roles (reference, reward) hold their weights in "
        "it; the trainable roles (policy, critic) always keep fp32 master weights and AdamW state and compute in it "
        "(autocast, or FSDP2's MixedPrecisionPolicy when sharded). auto: bfloat16 on GPU, float32 on CPU",
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="compute of the policy, critic and reference: bf16 (autocast over their weights) or fp32; "
        "auto: the compute dtype `dtype` names",
    )
    save_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="dtype of the final policy's HF directory; checkpoints keep the fp32 master weights",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="policy and critic: keep each decoder block's input only and recompute the "
        "rest in backward (less activation memory, about a third more compute)")
    shard_frozen: list[Literal["reference", "reward"]] = Field(
        default_factory=list,
        description="frozen roles whose replicas shard one copy of the model (FSDP2, as the trainable roles "
        "always are over their replicas) instead of each holding it whole",
    )
    # Placement (OpenRLHF-style): role actor groups in placement groups
    policy_resources: RoleResources = Field(default_factory=RoleResources)
    critic_resources: RoleResources = Field(default_factory=RoleResources)
    reference_resources: RoleResources = Field(default_factory=RoleResources)
    reward_resources: RoleResources = Field(default_factory=RoleResources)
    colocate: list[list[Role]] = Field(
        default_factory=list,
        description="groups of roles sharing bundles, e.g. [[policy, reference], [critic, reward]]",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    old_logprobs: Literal["auto", "rollout", "policy"] = Field(
        default="auto",
        description="pi_old's log-probs: the ones the rollout engine sampled with (rollout; TRL's way, one "
        "forward pass fewer), or recomputed by the policy (policy; OpenRLHF's way). auto: rollout for the HF "
        "engine in float32, policy otherwise (rl/rollout.old_logprobs_source)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads per role actor (policy, critic, reference, reward; the engines have "
        "`rollout.torch_threads`); null: its num_cpus rounded up. Roles that work at the same time (policy and "
        "critic train side by side) should not have more threads together than the node has cores",
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    # Durability
    checkpoint_every: int = Field(default=10, ge=1, description="iterations between checkpoints")
    checkpoints_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(
        default=3, ge=-1,
        description="role actor deaths survived by restarting every role from the latest checkpoint "
        "(as Ray Train's FailureConfig.max_failures); 0: fail at once; -1: no limit",
    )
    engine: Literal["almost_ray", "openrlhf"] = Field(
        default="almost_ray", description="openrlhf: map this config onto OpenRLHF's train_ppo_ray and submit it"
    )
    openrlhf: OpenRLHFConfig = Field(default_factory=OpenRLHFConfig, description="engine: openrlhf only")

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.advantage_estimator in GROUP_ESTIMATORS:
            if "n_samples_per_prompt" not in self.model_fields_set:
                self.n_samples_per_prompt = GROUP_SIZE_DEFAULT
            if self.n_samples_per_prompt < 2:
                raise ValueError(f"n_samples_per_prompt must be 2 or more with advantage_estimator "
                                 f"{self.advantage_estimator} (its baseline is the other responses to the same prompt)")
            if self.gamma != 1.0:
                raise ValueError(f"gamma must be 1 with advantage_estimator {self.advantage_estimator} (its baseline "
                                 "is of the whole response's score)")
        if self.rollout_batch_size % self.n_samples_per_prompt:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of n_samples_per_prompt "
                f"({self.n_samples_per_prompt}): it counts responses, n_samples_per_prompt of them per prompt"
            )
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of minibatch_size "
                f"({self.minibatch_size})"
            )
        seen: list[str] = []
        for group in self.colocate:
            for role in group:
                if role in seen:
                    raise ValueError(f"colocate: role {role!r} is in more than one group")
                seen.append(role)
        return self

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator != "gae"

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles a run starts: all four, or no critic with a critic-free estimator."""
        return tuple(r for r in ROLES if not (r == "critic" and self.critic_free))

    @property
    def prompts_per_iteration(self) -> int:
        return self.rollout_batch_size // self.n_samples_per_prompt

    def resources(self, role: Role) -> RoleResources:
        return getattr(self, f"{role}_resources")

    def bf16_compute(self, device_type: str) -> bool:
        """Whether the roles' forward passes compute in bf16 on this device type."""
        if self.mixed_precision != "auto":
            return self.mixed_precision == "bf16"
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")

    def sharded(self, role: str) -> bool:
        """Whether `role`'s replicas shard one model with FSDP2: the trainable roles whenever they have two
        replicas or more (as train/loop.py does), a frozen role when `shard_frozen` names it."""
        if self.resources(role).replicas < 2:
            return False
        return role in ("policy", "critic") or role in self.shard_frozen

    @property
    def iterations(self) -> int:
        """Iterations to run: total_episodes / rollout_batch_size, rounded up."""
        return -(-self.total_episodes // self.rollout_batch_size)


def shared_gpu_ranks(cfg: PPOConfig) -> list[str]:
    """Settings under which two ranks of one NCCL group could land on one GPU, which NCCL refuses: checked
    before this project's PPO places anything (`rl.roles.plan_bundles`, the stage's input checks, the plan);
    `--engine openrlhf` places its own roles.

    The NCCL groups: the replicas of each sharded role (`PPOConfig.sharded`), and the weight sync of the
    policy's rank 0 with every vLLM worker. Ray gives a bundle of whole GPUs GPUs of its own, but bundles
    holding fractions may get the same GPU, so at most one bundle holding a rank of a sharded role may hold a
    fraction of one (colocated roles' fractions add up: policy 0.5 + reference 0.5 is one GPU); and a vLLM engine's
    ranks hold a whole GPU each in their own placement group: an engine sharing the policy's GPU would need
    CUDA IPC handles or vLLM's sleep/wake (OpenRLHF's `--vllm.enable_sleep`), which are not implemented.
    """
    problems = []
    colocated = {r: group for group in cfg.colocate for r in group}
    for role in ROLES:
        res = cfg.resources(role)
        if res.num_gpus <= 0 or not cfg.sharded(role):
            continue
        group = colocated.get(role, [role])
        fractional = []  # (replica, GPUs of its bundle, roles sharing it)
        for i in range(res.replicas):
            sharing = [r for r in group if i < cfg.resources(r).replicas]
            gpus = sum(cfg.resources(r).num_gpus for r in sharing)
            if gpus != int(gpus):
                fractional.append((i, gpus, sharing))
        if len(fractional) >= 2:
            (i, gpus, sharing), (j, other, _) = fractional[:2]
            with_ = f" (with {', '.join(r for r in sharing if r != role)})" if len(sharing) > 1 else ""
            problems.append(
                f"{role}_resources: the {res.replicas} {role} replicas form one NCCL group, and the bundles of "
                f"replicas {i} and {j} hold {gpus:g} and {other:g} GPU{with_}: Ray may give both one GPU, which "
                "NCCL refuses; make the bundles whole GPUs (colocated num_gpus adding up to 1)")
    if cfg.rollout.backend == "vllm" and cfg.rollout.num_gpus not in (0, 1):
        problems.append(
            f"rollout.num_gpus: {cfg.rollout.num_gpus:g}: each tensor-parallel rank of a vLLM engine holds one whole "
            "GPU of its own (more GPUs: tensor_parallel_size); sharing the policy's GPU would put two ranks of the "
            "weight-sync NCCL group (policy rank 0 and the engine) on one GPU, and colocation by CUDA IPC or vLLM "
            "sleep/wake is not implemented")
    return problems


class PPOGRPOConfig(StageSection):
    """The optional `ppo_grpo` stage (`almost-ray pipeline --with ppo_grpo`): PPO once more from the same SFT
    policy, RM and prompts, with a critic-free estimator, into its own folder (`runs/<run>/ppo_grpo/`) so
    the report can set it beside the paper's PPO. Every field left null takes the `ppo` section's value;
    everything else (policy, RM, prompts, lengths, learning rate, placement, ...) IS the `ppo` section.
    """

    advantage_estimator: CriticFreeEstimator = Field(
        default="grpo", description="the critic-free estimator (rl/losses.py); the folder keeps its name")
    n_samples_per_prompt: int | None = Field(
        default=None, ge=2, description=f"responses per prompt (a group); null: {GROUP_SIZE_DEFAULT}, or ppo's when "
        "it sets one")
    use_kl_loss: bool | None = Field(default=None, description="the KL as a loss term (GRPO's way); null: ppo's")
    kl_estimator: Literal["k1", "k3"] | None = Field(default=None, description="null: ppo's")
    kl_coef: float | None = Field(default=None, ge=0, description="null: ppo's")
    total_episodes: int | None = Field(default=None, ge=1, description="null: ppo's")
    rollout_batch_size: int | None = Field(default=None, ge=1, description="responses per iteration; null: ppo's")
    minibatch_size: int | None = Field(default=None, ge=1, description="null: ppo's")
    micro_batch_size: int | None = Field(default=None, ge=1, description="null: ppo's")

    def applied_to(self, ppo: PPOConfig) -> PPOConfig:
        """The `ppo` section with this section's fields set: what the ppo_grpo stage runs (and its manifest
        hashes). A combination PPOConfig refuses raises `ValueError` naming the field."""
        changes = {k: v for k, v in self.model_dump(exclude={"output_dir"}).items() if v is not None}
        if ppo.n_samples_per_prompt >= 2 and "n_samples_per_prompt" not in changes:
            changes["n_samples_per_prompt"] = ppo.n_samples_per_prompt
        base = ppo.model_dump(exclude={"n_samples_per_prompt", "output_dir"})
        return PPOConfig.model_validate({**base, **changes, "output_dir": self.output_dir})
