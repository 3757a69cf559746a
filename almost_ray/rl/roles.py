"""The four PPO roles as Ray actor groups, placed OpenRLHF-style (ALMoST Section 2.3 on Ray).

- policy: the SFT model being trained (HF causal LM); critic: per-token values from a sequence
  classifier's score head, initialised from the RM (`critic_init: reward`, OpenRLHF's default) or
  from the SFT model; both data-parallel across their replicas with torch.distributed (gloo on CPU,
  NCCL on GPU): each replica gets a slice of the minibatch, losses are divided by the response-token
  count of the WHOLE minibatch and gradients are summed (all-reduce), so every replica takes the
  same step, the one a single replica would take on the whole minibatch.
- reference: the frozen SFT model (log-probabilities for the KL penalty); reward: the frozen RM,
  scoring the `Human:`/`Assistant:` text exactly as `train-rm` trained it (`models.reward.RewardModel`).

Placement: every role contributes bundles to ONE placement group, so the configured strategy (PACK,
SPREAD, ...) applies across roles and the whole reservation is all-or-nothing. Roles named together
in `colocate` share bundles: replica i of each sits in the group's bundle i, whose resources are the
sum of the colocated replicas' fractions (OpenRLHF colocates actor and reference the same way).
"""

from __future__ import annotations

import math
import socket
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from almost_ray.cluster import memory
from almost_ray.config_base import ConfigError
from almost_ray.rl import losses
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.episodes import pack, response_logprobs, response_values, split_rows, take
from almost_ray.train.optim import adamw, cosine_with_warmup

ROLLOUT = "rollout"


# ---------------------------------------------------------------------------------------------- placement
def role_resources(cfg: PPOConfig, role: str) -> tuple[int, dict[str, float]]:
    """(replicas, resources of one replica) of a role or of the rollout engines."""
    res = cfg.rollout if role == ROLLOUT else cfg.resources(role)
    replicas = cfg.rollout.engines if role == ROLLOUT else res.replicas
    return replicas, {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}


def plan_bundles(cfg: PPOConfig) -> tuple[list[dict[str, float]], dict[str, list[int]]]:
    """The bundles of the placement group and, per role, the bundle index of each of its replicas.

    Only the roles the run starts (`cfg.roles`: no critic with a critic-free estimator) are planned; a
    `colocate` group keeps its other roles.
    """
    colocate = [[r for r in group if r in cfg.roles] for group in cfg.colocate]
    colocated = {r for group in colocate for r in group}
    groups = [g for g in colocate if g] + [[r] for r in cfg.roles if r not in colocated] + [[ROLLOUT]]
    bundles: list[dict[str, float]] = []
    where: dict[str, list[int]] = {}
    for group in groups:
        sizes = {role: role_resources(cfg, role) for role in group}
        first = len(bundles)
        for i in range(max(n for n, _ in sizes.values())):
            bundle: dict[str, float] = {}
            for n, res in sizes.values():
                if i < n:
                    for key, value in res.items():
                        bundle[key] = bundle.get(key, 0.0) + value
            bundle = {k: v for k, v in bundle.items() if v > 0}
            if not bundle:
                raise ConfigError(f"ppo: roles {group} reserve no CPU or GPU (a placement bundle cannot be empty)")
            if bundle.get("GPU", 0) > 1 and len(group) > 1:
                raise ConfigError(f"ppo.colocate {group}: num_gpus of colocated roles add up to more than one GPU")
            bundles.append(bundle)
        for role, (n, _) in sizes.items():
            where[role] = [first + i for i in range(n)]
    return bundles, where


@dataclass
class Placement:
    """The placement group and the actor groups in it; `remove` has each actor report its peak memory
    (`memory.gather`, for the manifest), kills the actors and frees the bundles."""

    group: object
    where: dict[str, list[int]]
    actors: dict[str, list] = field(default_factory=dict)

    def start(self, role: str, cls, cfg: PPOConfig, *args) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        _, res = role_resources(cfg, role)
        memory.ensure_ledger()
        handles = []
        for rank, bundle in enumerate(self.where[role]):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)
            actor = ray.remote(cls).options(
                num_cpus=res["CPU"], num_gpus=res["GPU"], scheduling_strategy=strategy, max_restarts=0
            )
            handles.append(actor.remote(*args, rank=rank, world=len(self.where[role])))
        self.actors[role] = handles
        return handles

    def remove(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        memory.gather({f"ppo.{role}": handles for role, handles in self.actors.items()})  # for the manifest
        for handles in self.actors.values():
            for actor in handles:
                ray.kill(actor)
        remove_placement_group(self.group)


def reserve(cfg: PPOConfig, timeout_s: float = 600) -> Placement:
    """Reserve every role's bundles in one placement group; fails clearly when the cluster is too small."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles, where = plan_bundles(cfg)
    group = placement_group(bundles, strategy=cfg.placement_strategy, name="")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(f"ppo: the cluster cannot place bundles {bundles} with strategy {cfg.placement_strategy} "
                          f"(waited {timeout_s:.0f} s; cluster resources: {ray.cluster_resources()})")
    return Placement(group, where)


# ---------------------------------------------------------------------------------------------- role actors
class RoleActor:
    """What every role actor has: its config, device, thread count, and where it runs."""

    def __init__(self, cfg: dict, role: str, rank: int, world: int):
        self.cfg = PPOConfig.model_validate(cfg)
        self.rank, self.world = rank, world
        _, res = role_resources(self.cfg, role)
        self.device = torch.device("cuda" if res["GPU"] > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            threads = self.cfg.rollout.torch_threads if role == ROLLOUT else self.cfg.torch_threads
            torch.set_num_threads(threads or max(1, math.ceil(res["CPU"])))
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a fresh critic head is *meant* to be missing from the SFT checkpoint
        hf_logging.disable_progress_bar()

    def compute(self):
        """The context of this role's forward passes: bf16 autocast over its weights when
        `mixed_precision` asks for it (losses and log-softmax stay fp32: rl/episodes.py casts)."""
        if self.cfg.bf16_compute(self.device.type):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def use_episode_layout(self) -> None:
        """Padding-free episodes (`ppo.padding_free`) need an attention that keeps each one to itself:
        flash-attention 2 under bf16 compute on a GPU where it is installed, SDPA per episode otherwise."""
        if self.cfg.padding_free:
            from almost_ray.models.packing import use_packed_attention

            use_packed_attention(self.model, flash=self.device.type == "cuda" and self.cfg.bf16_compute("cuda"))

    @torch.no_grad()
    def score_episodes(self, batch: dict, width: int, fn) -> torch.Tensor:
        """`fn(packed)` over `batch` in micro-batches, with this role's model (`self.model`) in eval mode
        and under its compute context: the scoring pass of the policy, the reference and the critic."""
        self.model.eval()
        with self.compute():
            return _in_micro_batches(batch, self.cfg.micro_batch_size, width, self.pad_id, self.cfg.padding_free,
                                     self.device, fn)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def address(self) -> tuple[str, int]:
        """A free TCP address on this node, for rank 0 of a process group."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join_group(self, host: str, port: int) -> None:
        """torch.distributed among the replicas of one trainable role (gloo on CPU, NCCL on GPU)."""
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)


class TrainableActor(RoleActor):
    """A model trained with AdamW and the paper's cosine decay (1e-6 to 8e-7, Appendix D.3)."""

    model: torch.nn.Module

    def setup_optimizer(self, lr: float) -> None:
        cfg = self.cfg
        self.optimizer = adamw(self.model.parameters(), lr, cfg.adam_betas, cfg.weight_decay)
        total = cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        min_ratio = min(1.0, cfg.min_lr / cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, total, 0, min_ratio)
        )

    def train_step(self, piece: dict, minibatch_tokens: float, width: int) -> dict[str, float]:
        """One optimizer step on this replica's slice of a minibatch; returns loss and stat sums."""
        self.model.train()
        sums: dict[str, float] = {}
        rows = len(piece["response_ids"])
        for chunk in split_rows(rows, max(1, math.ceil(rows / self.cfg.micro_batch_size))) if rows else []:
            micro = take(piece, chunk)
            packed = pack(micro["prompt_ids"], micro["response_ids"], self.pad_id, width,
                          self.cfg.padding_free).to(self.device)
            with self.compute():
                loss, stats = self.micro_loss(packed, {k: v.to(self.device) for k, v in micro.items()
                                                       if isinstance(v, torch.Tensor)})
            (loss / minibatch_tokens).backward()
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()]
        if self.world > 1:
            import torch.distributed as dist

            for g in grads:  # each loss is already a share of the global minibatch mean: sum the shares
                dist.all_reduce(g)
            for p, g in zip(self.model.parameters(), grads):
                p.grad = g
        if self.cfg.max_grad_norm is not None:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        sums["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def save(self, directory: str) -> None:
        """Weights (safetensors, shared tensors handled) and optimizer + scheduler state (tensors only)."""
        from safetensors.torch import save_model

        if self.rank != 0:
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(out / "model.safetensors"))
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": sched}, out / "optim.pt")

    def load(self, directory: str) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(Path(directory) / "model.safetensors"), device=str(self.device))
        state = torch.load(Path(directory) / "optim.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})


class PolicyActor(TrainableActor):
    """pi_phi: starts as the SFT model; its log-probs are also pi_old for the ratio of the current batch."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "policy", rank, world)
        from almost_ray.models.loading import load_causal_lm, load_tokenizer

        self.model_dir = model_dir
        self.model = load_causal_lm(model_dir, self.cfg.dtype, device=str(self.device))
        self.model.config.use_cache = False
        self.use_episode_layout()
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        self.setup_optimizer(self.cfg.lr)

    def logprobs(self, batch: dict, width: int) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_logprobs(self.model, p, self.cfg.temperature))

    def micro_loss(self, packed, tensors):
        """The clipped surrogate, plus kl_coef * KL to the reference when the KL is a loss term (GRPO)."""
        logprobs = response_logprobs(self.model, packed, self.cfg.temperature)
        loss, stats = losses.policy_loss(logprobs, tensors["old_logprobs"], tensors["advantages"], packed.mask,
                                         self.cfg.clip_range)
        if self.cfg.use_kl_loss:
            kl = losses.kl_loss(logprobs, tensors["ref_logprobs"], packed.mask, self.cfg.kl_estimator)
            stats["kl_loss"] = kl.detach()
            loss = loss + self.cfg.kl_coef * kl
        return loss, stats

    def weights(self) -> dict:
        """The state dict as arrays (rl/weights.py); returned through the object store once, loaded by
        every HF engine."""
        from almost_ray.rl.weights import to_arrays

        return to_arrays(self.model.state_dict())

    def save_hf(self, out: str) -> None:
        """The final policy as a plain HF directory (safetensors + tokenizer), written atomically."""
        from almost_ray.data.atomic import atomic_directory
        from almost_ray.models.loading import load_tokenizer, ready_for_generation

        if self.rank == 0:
            with atomic_directory(Path(out)) as tmp:
                ready_for_generation(self.model)
                self.model.save_pretrained(tmp, safe_serialization=True)
                load_tokenizer(self.model_dir).save_pretrained(tmp)

    # GPU: weights to vLLM engines by NCCL broadcast from rank 0 (vLLM's StatelessProcessGroup + PyNccl).
    def open_engine_sync(self, host: str, port: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
        # PyNcclCommunicator.broadcast asserts each tensor's device equals the one given here, and the
        # parameters sit on an indexed device (cuda:0), which never equals a bare torch.device("cuda").
        device = torch.device("cuda", torch.cuda.current_device())
        self._engine_sync = PyNcclCommunicator(group, device=device)

    def broadcast_weights(self, engines: list) -> None:
        import ray

        for name, param in self.model.named_parameters():
            dtype = str(param.dtype).removeprefix("torch.")
            pending = [e.update_weight.remote(name, dtype, tuple(param.shape)) for e in engines]
            self._engine_sync.broadcast(param.data, src=0, stream=torch.cuda.current_stream())
            ray.get(pending)


class CriticActor(TrainableActor):
    """V(s): a sequence classifier's score head read at every response position (see episodes.py)."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "critic", rank, world)
        from transformers import AutoModelForSequenceClassification

        from almost_ray.models.loading import load_tokenizer, torch_dtype

        with torch.random.fork_rng(devices=[]):  # a fresh head (critic_init: policy) is the same on every replica
            torch.manual_seed(self.cfg.seed)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=1, dtype=torch_dtype(self.cfg.dtype, self.device.type),
                trust_remote_code=False, use_safetensors=True,
            ).to(self.device)
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        self.model.config.pad_token_id = self.pad_id
        self.use_episode_layout()
        self.setup_optimizer(self.cfg.critic_lr)

    def values(self, batch: dict, width: int) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_values(self.model, p))

    def micro_loss(self, packed, tensors):
        values = response_values(self.model, packed)
        loss, stats = losses.value_loss(values, tensors["old_values"], tensors["returns"], packed.mask,
                                        self.cfg.clip_range_value)
        return self.cfg.value_loss_coef * loss, stats


class ReferenceActor(RoleActor):
    """pi_SFT, frozen: the anchor of the KL penalty."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "reference", rank, world)
        from almost_ray.models.loading import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model_dir, self.cfg.dtype, device=str(self.device))
        self.use_episode_layout()
        self.pad_id = load_tokenizer(model_dir).pad_token_id

    def logprobs(self, batch: dict, width: int) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_logprobs(self.model, p, self.cfg.temperature))


class RewardActor(RoleActor):
    """The frozen synthetic RM; `scorer` (any object with RewardModel's `score`) replaces it in tests."""

    def __init__(self, cfg: dict, model_dir: str, scorer=None, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "reward", rank, world)
        from almost_ray.models.reward import RewardModel

        self.rm = scorer() if scorer is not None else RewardModel(
            model_dir, dtype=self.cfg.dtype, device=self.device.type,
            max_length=self.cfg.max_prompt_tokens + self.cfg.max_new_tokens + 16,
            batch_size=self.cfg.micro_batch_size,
        )

    def score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        return [float(s) for s in self.rm.score(conversations)] if conversations else []


def _in_micro_batches(batch: dict, size: int, width: int, pad_id: int, padding_free: bool, device,
                      fn) -> torch.Tensor:
    n = len(batch["response_ids"])
    if n == 0:
        return torch.zeros(0, width)
    out = []
    for rows in split_rows(n, math.ceil(n / size)):
        part = take(batch, rows)
        packed = pack(part["prompt_ids"], part["response_ids"], pad_id, width, padding_free)
        out.append(fn(packed.to(device)).float().cpu())
    return torch.cat(out)
