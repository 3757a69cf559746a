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
from almost_ray.data.atomic import atomic_directory
from almost_ray.models.loading import (
    load_causal_lm,
    load_tokenizer,
    ready_for_generation,
    resolve_model_dir,
    torch_dtype,
)
from almost_ray.models.packing import use_packed_attention
from almost_ray.models.reward import RewardModel, classifier_config, empty_classifier, load_classifier
from almost_ray.rl import losses
from almost_ray.rl.config import PPOConfig, shared_gpu_ranks
from almost_ray.rl.episodes import pack, response_logprobs, response_values, split_rows, take
from almost_ray.rl.weights import gathered_weights, to_arrays
from almost_ray.train.optim import adamw, cosine_with_warmup
from almost_ray.train.sharding import shard_from_rank0

ROLLOUT = "rollout"


# ---------------------------------------------------------------------------------------------- placement
def role_resources(cfg: PPOConfig, role: str) -> tuple[int, dict[str, float]]:
    """(replicas, resources of one replica) of a role or of the rollout engines."""
    res = cfg.rollout if role == ROLLOUT else cfg.resources(role)
    replicas = cfg.rollout.engines if role == ROLLOUT else res.replicas
    return replicas, {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}


def plan_bundles(cfg: PPOConfig, separate_engines: bool = False) -> tuple[list[dict[str, float]], dict[str, list[int]]]:
    """The bundles of the roles' placement group and, per role, the bundle index of each of its replicas.

    Only the roles the run starts (`cfg.roles`: no critic with a critic-free estimator) are planned; a
    `colocate` group keeps its other roles. The rollout engines have bundles here too, unless they are vLLM
    engines (`separate_engines`), which get placement groups of their own (`engine_bundles`). Refuses a plan
    that could put two ranks of one NCCL group on one GPU (`config.shared_gpu_ranks`)."""
    problems = shared_gpu_ranks(cfg)
    if problems:
        raise ConfigError("ppo." + "\nppo.".join(problems))
    colocate = [[r for r in group if r in cfg.roles] for group in cfg.colocate]
    colocated = {r for group in colocate for r in group}
    groups = [g for g in colocate if g] + [[r] for r in cfg.roles if r not in colocated]
    groups += [] if separate_engines else [[ROLLOUT]]
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


def engine_bundles(cfg: PPOConfig) -> list[dict[str, float]]:
    """One vLLM engine's own placement group, as OpenRLHF's `create_vllm_engines` makes it: a one-GPU bundle
    per tensor-parallel rank. The engine actor sits in bundle 0 (holding the GPU itself only at tensor
    parallel 1) and vLLM's Ray executor puts one worker in each bundle (`vllm_engine_env`)."""
    return [{"CPU": float(cfg.rollout.num_cpus), "GPU": 1.0} for _ in range(cfg.rollout.tensor_parallel_size)]


@dataclass
class Placement:
    """The roles' placement group (and each vLLM engine's) and the actor groups in them; `remove` has each
    actor report its peak memory (`memory.gather`, for the manifest), kills the actors and frees the bundles."""

    group: object
    where: dict[str, list[int]]
    engine_groups: list = field(default_factory=list)
    actors: dict[str, list] = field(default_factory=dict)

    def start(self, role: str, cls, cfg: PPOConfig, *args) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        _, res = role_resources(cfg, role)
        memory.ensure_ledger()
        handles = []
        if role == ROLLOUT and self.engine_groups:
            tp = cfg.rollout.tensor_parallel_size
            for rank, group in enumerate(self.engine_groups):  # the engine; vLLM starts its workers in the group
                strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                            placement_group_capture_child_tasks=True)
                actor = ray.remote(cls).options(num_cpus=res["CPU"], num_gpus=1 if tp == 1 else 0,
                                                scheduling_strategy=strategy, max_restarts=0)
                handles.append(actor.remote(*args, rank=rank, world=len(self.engine_groups)))
            self.actors[role] = handles
            return handles
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
        for group in [self.group, *self.engine_groups]:
            remove_placement_group(group)


def reserve(cfg: PPOConfig, separate_engines: bool = False, timeout_s: float = 600) -> Placement:
    """Reserve the roles' bundles in one placement group, and with `separate_engines` (vLLM) one group per
    engine; all or nothing, failing clearly when the cluster is too small."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles, where = plan_bundles(cfg, separate_engines)
    group = placement_group(bundles, strategy=cfg.placement_strategy, name="")
    engines = ([placement_group(engine_bundles(cfg), strategy="PACK", name="") for _ in range(cfg.rollout.engines)]
               if separate_engines else [])
    groups = [group, *engines]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for g in groups:
            remove_placement_group(g)
        raise ConfigError(f"ppo: the cluster cannot place bundles {bundles} with strategy {cfg.placement_strategy}"
                          f"{f' and {len(engines)} engine groups of {engine_bundles(cfg)}' if engines else ''} "
                          f"(waited {timeout_s:.0f} s; cluster resources: {ray.cluster_resources()})")
    return Placement(group, where, engines)


# ---------------------------------------------------------------------------------------------- role actors
def role_device(num_gpus: float) -> torch.device:
    """A role actor's device: the GPU Ray gave it, BY INDEX, else the CPU. vLLM's `PyNcclCommunicator`
    asserts that every tensor's device equals its own, and `torch.device("cuda")` is not `cuda:0`."""
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RoleActor:
    """What every role actor has: its config, device, thread count, and where it runs.

    A sharded role (`PPOConfig.sharded`) loads its model only once its replicas have joined their process
    group (`join_group`): FSDP2 shards it over them and rank 0 alone reads the checkpoint. Every replica of
    a sharded role must run the same number of forward (and backward) passes, so the driver says how many
    micro-batches each call has, and a replica with fewer episodes runs empty ones (`empty_episode`)."""

    model: torch.nn.Module

    def __init__(self, cfg: dict, role: str, rank: int, world: int):
        self.cfg = PPOConfig.model_validate(cfg)
        self.role, self.rank, self.world = role, rank, world
        _, res = role_resources(self.cfg, role)
        self.device = role_device(res["GPU"])
        self.sharded = role != ROLLOUT and self.cfg.sharded(role)
        self.bf16 = self.cfg.bf16_compute(self.device.type)
        if self.device.type == "cpu":
            threads = self.cfg.rollout.torch_threads if role == ROLLOUT else self.cfg.torch_threads
            torch.set_num_threads(threads or max(1, math.ceil(res["CPU"])))
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a fresh critic head is *meant* to be missing from the SFT checkpoint
        hf_logging.disable_progress_bar()

    def setup(self) -> None:
        """Load the model (and the optimizer of a trainable role): at construction, or after `join_group`
        when sharded."""

    def load_model(self, full, empty, dtype: torch.dtype, train: bool = False,
                   episodes: bool = True) -> torch.nn.Module:
        """This role's model on its device. `full()` loads the checkpoint on the CPU; `empty()` builds the
        same model on the meta device. Unsharded, the whole model moves to the device; sharded, FSDP2 splits
        the meta model over the replicas and fills it from rank 0's copy (train/loop.shard_from_rank0), with
        bf16 compute through `MixedPrecisionPolicy` over the `dtype` (fp32 for trainable roles) weights.
        A model to `train` recomputes its activations in backward when `gradient_checkpointing` asks."""
        def prepare(model: torch.nn.Module) -> torch.nn.Module:
            model.config.use_cache = False  # scoring and training build no KV cache (one per layer otherwise)
            if episodes:  # the RM reads padded batches of text, not episodes
                self.use_episode_layout(model)
            if train and self.cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model

        if not self.sharded:
            return prepare(full().to(self.device))
        whole = full() if self.rank == 0 else None
        model = prepare(empty().to(dtype))
        return shard_from_rank0(model, whole, self.device, self.world, self.bf16, reshard=True)

    def compute(self):
        """The context of this role's forward passes: bf16 autocast over its weights under bf16 compute
        (losses and log-softmax stay fp32: rl/episodes.py casts); a sharded model already computes in bf16
        through FSDP2's mixed-precision policy."""
        if self.bf16 and not self.sharded:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def use_episode_layout(self, model: torch.nn.Module) -> None:
        """Padding-free episodes (`ppo.padding_free`) need an attention that keeps each one to itself:
        flash-attention 2 under bf16 compute on a GPU where it is installed, SDPA per episode otherwise."""
        if self.cfg.padding_free:

            use_packed_attention(model, flash=self.device.type == "cuda" and self.bf16)

    @torch.no_grad()
    def score_episodes(self, batch: dict, width: int, fn, micro_batches: int | None = None) -> torch.Tensor:
        """`fn(packed)` over `batch` in micro-batches, with this role's model (`self.model`) in eval mode
        and under its compute context: the scoring pass of the policy, the reference and the critic."""
        self.model.eval()
        n = len(batch["response_ids"])
        parts = _chunks(n, self.cfg.micro_batch_size, micro_batches if self.sharded else None)
        out = []
        with self.compute():
            for rows in parts:
                part = take(batch, rows) if len(rows) else empty_episode(self.pad_id, width)
                packed = pack(part["prompt_ids"], part["response_ids"], self.pad_id, width, self.cfg.padding_free)
                result = fn(packed.to(self.device)).float().cpu()
                if len(rows):
                    out.append(result)
        return torch.cat(out) if out else torch.zeros(0, width)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def local_bytes(self) -> int:
        """Bytes of the tensors this replica holds of its model: its weights (a shard of each when sharded)
        and, for a trainable role, its optimizer state; what the GPU memory plan (almost_ray/plan) estimates."""
        def local(t: torch.Tensor) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        total = sum(local(p) for p in self.model.parameters())
        for state in getattr(getattr(self, "optimizer", None), "state", {}).values():
            total += sum(local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return total

    def address(self) -> tuple[str, int]:
        """A free TCP address on this node, for rank 0 of a process group."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join_group(self, host: str, port: int) -> None:
        """torch.distributed among the replicas of one sharded role (gloo on CPU, NCCL on GPU); then the
        sharded model is loaded."""
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world,
                                device_id=self.device if self.device.type == "cuda" else None)
        if self.sharded:
            self.setup()


def _chunks(rows: int, size: int, count: int | None) -> list[range]:
    """Row ranges of the micro-batches: `ceil(rows / size)` of them, or exactly `count` (a sharded role,
    whose replicas must all run the same number; some may be empty)."""
    if count is None:
        return split_rows(rows, max(1, math.ceil(rows / size))) if rows else []
    return split_rows(rows, count)


def empty_episode(pad_id: int, width: int) -> dict:
    """A one-token episode whose results are dropped: what a replica of a sharded role computes for a
    micro-batch it has no episodes for, so that it joins its peers' all-gathers and reduce-scatters."""
    return {"prompt_ids": [[pad_id]], "response_ids": [[pad_id]], "old_logprobs": torch.zeros(1, width),
            "advantages": torch.zeros(1, width), "old_values": torch.zeros(1, width), "returns": torch.zeros(1, width)}


def micro_batch_count(rows: int, replicas: int, size: int) -> int:
    """Micro-batches per replica when `rows` are split over `replicas` (trainer.split_rows): enough for the
    largest slice. The replicas of a sharded role all run this many."""
    return max(1, math.ceil(math.ceil(rows / replicas) / size))


class TrainableActor(RoleActor):
    """A model trained with AdamW and the paper's cosine decay (1e-6 to 8e-7, Appendix D.3).

    Its weights and AdamW state are fp32 (master weights) whatever `ppo.dtype` says; the forward and backward
    passes compute in bf16 under bf16 compute (autocast, or FSDP2's `MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)` when sharded), as DeepSpeed's bf16 optimizer and FSDP2 do: at the paper's lr 1e-6 an
    update is far below bf16's spacing near the weights' scale, so bf16 weights updated in place would
    hardly change (tests/test_rl_ppo.py, `test_bf16_updates_survive_at_paper_lr`)."""

    def setup_optimizer(self, lr: float) -> None:
        cfg = self.cfg
        self.optimizer = adamw(self.model.parameters(), lr, cfg.adam_betas, cfg.weight_decay)
        total = cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        min_ratio = min(1.0, cfg.min_lr / cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, total, 0, min_ratio)
        )

    def train_step(self, piece: dict, minibatch_tokens: float, width: int,
                   micro_batches: int | None = None) -> dict[str, float]:
        """One optimizer step on this replica's slice of a minibatch; returns loss and stat sums.

        Each replica's loss is its share of the minibatch's token mean (divided by the WHOLE minibatch's
        response tokens); sharded, FSDP2 averages gradients over the replicas, so the loss is scaled by
        the replica count and the reduced gradient is the minibatch mean: the step one replica would take."""
        self.model.train()
        sums: dict[str, float] = {}
        chunks = _chunks(len(piece["response_ids"]), self.cfg.micro_batch_size,
                         micro_batches if self.sharded else None)
        replicas = self.world if self.sharded else 1
        for k, rows in enumerate(chunks):
            if self.sharded:  # reduce-scatter the gradients once per step, after the last micro-batch
                self.model.set_requires_gradient_sync(k == len(chunks) - 1)
            micro = take(piece, rows) if len(rows) else empty_episode(self.pad_id, width)
            packed = pack(micro["prompt_ids"], micro["response_ids"], self.pad_id, width,
                          self.cfg.padding_free).to(self.device)
            with self.compute():
                loss, stats = self.micro_loss(packed, {k: v.to(self.device) for k, v in micro.items()
                                                       if isinstance(v, torch.Tensor)})
            (loss / minibatch_tokens * (replicas if len(rows) else 0)).backward()
            if len(rows):
                for key, value in {"loss": loss.detach(), **stats}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        sums["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def save(self, directory: str) -> None:
        """Weights (safetensors, shared tensors handled) and optimizer + scheduler state (tensors only);
        sharded, every replica writes its shards of both (torch.distributed.checkpoint), as train/loop.py does."""
        out = Path(directory)
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))
            if self.rank == 0:
                torch.save({"scheduler": sched}, out / "scheduler.pt")
            return
        from safetensors.torch import save_model

        if self.rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(out / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": sched}, out / "optim.pt")

    def load(self, directory: str) -> None:
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=directory)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            sched = torch.load(Path(directory) / "scheduler.pt", weights_only=True)["scheduler"]
            self.scheduler.load_state_dict({**self.scheduler.state_dict(), **sched})
            return
        from safetensors.torch import load_model

        load_model(self.model, str(Path(directory) / "model.safetensors"), device=str(self.device))
        state = torch.load(Path(directory) / "optim.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})


class PolicyActor(TrainableActor):
    """pi_phi: starts as the SFT model; its log-probs are also pi_old for the ratio of the current batch."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "policy", rank, world)

        self.model_dir = model_dir
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        if not self.sharded:
            self.setup()

    def setup(self) -> None:

        self.model = self.load_model(lambda: load_causal_lm(self.model_dir, "float32", device="cpu"),
                                     lambda: _empty_causal_lm(self.model_dir), torch.float32, train=True)
        self.setup_optimizer(self.cfg.lr)

    def logprobs(self, batch: dict, width: int, micro_batches: int | None = None) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_logprobs(self.model, p, self.cfg.temperature),
                                   micro_batches)

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

    def weights(self) -> dict | None:
        """The weights as arrays (rl/weights.py), gathered layer by layer when sharded: every replica must
        be asked, rank 0 returns them (through the object store once, loaded by every HF engine)."""

        state = {}
        for name, tensor in gathered_weights(self.model):
            if self.rank == 0:  # a gathered tensor is freed when its layer is resharded: keep a copy
                state[name] = tensor.detach().to("cpu", copy=self.sharded)
        return to_arrays(state) if self.rank == 0 else None

    def save_hf(self, out: str) -> None:
        """The final policy as a plain HF directory (safetensors + tokenizer) in `save_dtype`, written
        atomically by rank 0 (a sharded policy's full weights are gathered there, on the CPU, into a fresh
        model of the plain transformers class, so the config names it rather than FSDP's wrapper)."""

        dtype = getattr(torch, self.cfg.save_dtype)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = self.model.state_dict()
        if self.rank != 0:
            return
        with atomic_directory(Path(out)) as tmp:
            if not self.sharded and dtype == torch.float32:
                model = self.model
            else:
                model = _empty_causal_lm(self.model_dir)
                model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
                model.tie_weights()
                model.config.dtype = dtype
            ready_for_generation(model)
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(self.model_dir).save_pretrained(tmp)

    # GPU: weights to vLLM engines by NCCL broadcast from rank 0 (vLLM's StatelessProcessGroup + PyNccl).
    def open_engine_sync(self, host: str, port: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
        # PyNcclCommunicator.broadcast asserts each tensor's device equals the one given here: the role's own,
        # indexed device (`role_device`: cuda:0), which a bare torch.device("cuda") never equals
        self._engine_sync = PyNcclCommunicator(group, device=self.device)

    def broadcast_weights(self, engines: list) -> None:
        """Every parameter to every engine, in the engines' dtype, one tensor at a time: the full tensors of
        one layer are gathered (when sharded), broadcast and freed before the next (OpenRLHF does the same
        per parameter under ZeRO-3), so the whole model is never gathered. Every replica must be asked."""
        import ray


        dtype = torch_dtype(self.cfg.dtype, self.device.type)
        for name, tensor in gathered_weights(self.model):
            if self.rank != 0:
                continue
            sent = tensor.detach().to(dtype).contiguous()
            pending = [e.update_weight.remote(name, str(dtype).removeprefix("torch."), tuple(sent.shape))
                       for e in engines]
            self._engine_sync.broadcast(sent, src=0)
            ray.get(pending)


class CriticActor(TrainableActor):
    """V(s): a sequence classifier's score head read at every response position (see episodes.py)."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "critic", rank, world)

        self.model_dir = str(resolve_model_dir(model_dir))
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        if not self.sharded:
            self.setup()

    def setup(self) -> None:
        from transformers import AutoModelForSequenceClassification


        def full():
            with torch.random.fork_rng(devices=[]):  # a fresh head (critic_init: policy) is the same on every replica
                torch.manual_seed(self.cfg.seed)
                return AutoModelForSequenceClassification.from_pretrained(
                    self.model_dir, config=classifier_config(self.model_dir), dtype=torch.float32,
                    trust_remote_code=False, use_safetensors=True)

        self.model = self.load_model(full, lambda: empty_classifier(classifier_config(self.model_dir)),
                                     torch.float32, train=True)
        self.setup_optimizer(self.cfg.critic_lr)

    def values(self, batch: dict, width: int, micro_batches: int | None = None) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_values(self.model, p), micro_batches)

    def micro_loss(self, packed, tensors):
        values = response_values(self.model, packed)
        loss, stats = losses.value_loss(values, tensors["old_values"], tensors["returns"], packed.mask,
                                        self.cfg.clip_range_value)
        return self.cfg.value_loss_coef * loss, stats


class ReferenceActor(RoleActor):
    """pi_SFT, frozen: the anchor of the KL penalty; in `dtype`, sharded when `shard_frozen` names it."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "reference", rank, world)

        self.model_dir = model_dir
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        if not self.sharded:
            self.setup()

    def setup(self) -> None:

        dtype = torch_dtype(self.cfg.dtype, self.device.type)
        self.model = self.load_model(lambda: load_causal_lm(self.model_dir, self.cfg.dtype, device="cpu"
                                                            if self.sharded else str(self.device)),
                                     lambda: _empty_causal_lm(self.model_dir), dtype).eval()

    def logprobs(self, batch: dict, width: int, micro_batches: int | None = None) -> torch.Tensor:
        return self.score_episodes(batch, width, lambda p: response_logprobs(self.model, p, self.cfg.temperature),
                                   micro_batches)


class RewardActor(RoleActor):
    """The frozen synthetic RM, scoring as `train-rm` trained it (`models.reward.RewardModel`); in `dtype`,
    sharded when `shard_frozen` names it. `scorer` (any object with RewardModel's `score`) replaces it in tests."""

    def __init__(self, cfg: dict, model_dir: str, scorer=None, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "reward", rank, world)
        self.model_dir, self.scorer = model_dir, scorer
        if not self.sharded:
            self.setup()

    def setup(self) -> None:

        if self.scorer is not None:
            self.rm = self.scorer()
            return
        model = None
        if self.sharded:
            model = self.load_model(lambda: load_classifier(self.model_dir, self.cfg.dtype, "cpu"),
                                    lambda: _empty_classifier(self.model_dir),
                                    torch_dtype(self.cfg.dtype, self.device.type), episodes=False)
        self.rm = RewardModel(self.model_dir, dtype=self.cfg.dtype, device=str(self.device),
                              max_length=self.cfg.max_prompt_tokens + self.cfg.max_new_tokens + 16,
                              batch_size=self.cfg.micro_batch_size, model=model)

    def score(self, conversations: list[list[dict[str, str]]], passes: int | None = None) -> list[float]:
        """RM scores; a sharded RM runs `passes` forward passes on every replica, even one with no work."""
        if self.sharded:
            return [float(s) for s in self.rm.score(conversations, passes)]
        return [float(s) for s in self.rm.score(conversations)] if conversations else []


def _empty_classifier(model_dir: str) -> torch.nn.Module:
    """The RM of `model_dir` (one output) built on the meta device."""
    from transformers import AutoConfig, AutoModelForSequenceClassification


    config = AutoConfig.from_pretrained(resolve_model_dir(str(model_dir)), num_labels=1, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def _empty_causal_lm(model_dir: str) -> torch.nn.Module:
    """The causal LM of `model_dir` built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM


    config = AutoConfig.from_pretrained(resolve_model_dir(str(model_dir)), trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
