"""What each stage of a config puts on the cluster: its phases (pools that run at the same time), each pool's
bundles (what Ray places on one node) and each replica's memory on each of its GPUs.

A pool is a Ray Data actor pool or a `ReplicaSet` (one bundle per replica), a Ray Train worker group (one
bundle per worker, Ray Train's PACK placement group), PPO's roles (`rl.roles.plan_bundles`: the same
bundles the run reserves, colocated roles sharing them) or PPO's vLLM engines (one placement group of
`tensor_parallel_size` one-GPU bundles each). The phases follow the stages' code: `compare` runs its pools
one after another, `rmsp` its roles side by side (one after another when they do not fit together, as
`rmsp.stage` does), `ppo` everything at once.

Models are read from their `config.json` only (`plan.shapes`). The models a pipeline trains (the RM, the SFT
and PPO policies) have the shape of the base model they start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.models.config import ModelConfig
from almost_ray.plan import memory
from almost_ray.plan.memory import Estimate
from almost_ray.plan.shapes import ModelShape, read_shape
from almost_ray.rl.roles import ROLLOUT, engine_bundles, plan_bundles
from almost_ray.train.config import TrainConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Member:
    """One replica (actor, worker or engine rank) in a bundle: its pool, rank and bytes on each of its GPUs."""

    pool: str
    rank: int
    estimate: Estimate


@dataclass
class Bundle:
    """What Ray places on one node: `gpus` GPUs (whole, or a fraction of one) and `cpus`, shared by `members`
    (colocated PPO roles); `group` names the placement group the bundle belongs to, if any."""

    gpus: float
    cpus: float
    members: list[Member]
    group: str = ""


@dataclass
class Pool:
    """A table row: one pool or role, its model and what one replica holds on each of its GPUs; `kind` and
    `config` say how the run starts it (a Ray Data pool or `ReplicaSet` of `ResourcesConfig`, Ray Train's
    workers of a `TrainConfig`, PPO's roles and engines of a `PPOConfig`), for the dry placement."""

    name: str
    model: str
    replicas: int
    gpus: float  # per replica
    estimate: Estimate
    settings: str = ""
    kind: str = "pool"  # pool | replica_set | train | ppo
    config: object = None


@dataclass
class Phase:
    pools: list[Pool] = field(default_factory=list)
    bundles: list[Bundle] = field(default_factory=list)

    def add(self, pool: Pool, bundles: list[Bundle]) -> None:
        self.pools.append(pool)
        self.bundles.extend(bundles)


@dataclass
class StagePlan:
    stage: str
    phases: list[Phase]
    problems: list[str] = field(default_factory=list)  # config errors found without placing anything
    alone_if_crowded: bool = False  # the stage runs its pools one after another when they do not fit together


class Shapes:
    """Model references -> shapes, from each model's config.json. A reference to a folder missing on this
    machine (the cluster's /models/...) is looked up by its last path part in `model_configs`."""

    def __init__(self, model_configs: Path | None = None):
        self.model_configs = Path(model_configs) if model_configs else None
        self._cache: dict[str, ModelShape] = {}

    def __call__(self, ref: str, field_name: str) -> ModelShape:
        if ref not in self._cache:
            self._cache[ref] = read_shape(self._config_json(ref, field_name))
        return self._cache[ref]

    def _config_json(self, ref: str, field_name: str) -> Path:
        if ref.startswith(("tiny:", "embedded:")):
            from almost_ray.models.loading import resolve_model_dir

            return resolve_model_dir(ref) / "config.json"
        path = Path(ref).expanduser()
        if (path / "config.json").is_file():
            return path / "config.json"
        if self.model_configs is not None and (self.model_configs / path.name / "config.json").is_file():
            return self.model_configs / path.name / "config.json"
        where = f" or {self.model_configs / path.name / 'config.json'}" if self.model_configs else ""
        raise ConfigError(f"{field_name}: {path / 'config.json'}{where}: not found (the plan reads each model's "
                          "config.json; give a folder of them with --model-configs)")


@dataclass
class Context:
    cfg: Config
    shapes: Shapes
    gpu_bytes: float


# ------------------------------------------------------------------------------------------- one pool
def generation_pool(ctx: Context, name: str, model: ModelConfig, res: ResourcesConfig, max_new_tokens: int,
                    problems: list[str], resources_path: str = "", kind: str = "pool") -> tuple[Pool, list[Bundle]]:
    """A pool of generators (`GenerationReplica`, `RoleReplica`, eval's scorers): vLLM preallocates its share
    of each GPU; an HF generator on a GPU holds its weights, KV cache and activations."""
    shape = ctx.shapes(model.ref, f"{name}.model.ref")
    vllm = res.num_gpus > 0 and model.backend in ("vllm", "auto")
    tp = model.tensor_parallel_size
    if res.num_gpus <= 0:
        est = Estimate(note="CPU")
    elif vllm:
        if res.num_gpus < tp:
            problems.append(f"{name}: tensor_parallel_size {tp} needs {tp} GPUs per replica, "
                            f"{resources_path or name + '.resources'}.num_gpus is {res.num_gpus:g}")
        est = memory.vllm_replica(shape, tp, model.gpu_memory_utilization, ctx.gpu_bytes, shape.max_positions,
                                  DTYPE_BYTES.get(model.dtype, 2))
    else:
        tokens = res.batch_size * shape.max_positions
        est = memory.frozen_replica(shape, "lm", DTYPE_BYTES.get(model.dtype, 2), 1, tokens, res.batch_size,
                                    kv_tokens=tokens)
    new = f", {max_new_tokens} new tokens" if max_new_tokens else ""
    pool = Pool(name, label(shape, "lm"), res.concurrency, res.num_gpus, est,
                f"{'vLLM' if vllm else 'HF'}{f', TP {tp}' if tp > 1 else ''}, batch {res.batch_size}{new}", kind, res)
    return pool, replica_bundles(name, res, est)


def reward_pool(ctx: Context, name: str, shape: ModelShape, dtype: str, max_length: int,
                res: ResourcesConfig, kind: str = "pool") -> tuple[Pool, list[Bundle]]:
    """An RM scoring pool (`RewardReplica`, `CandidateScorer`): padded batches of `batch_size` x `max_length`."""
    est = (memory.frozen_replica(shape, "score", DTYPE_BYTES.get(dtype, 2), 1, res.batch_size * max_length, 0)
           if res.num_gpus > 0 else Estimate(note="CPU"))
    pool = Pool(name, label(shape, "score"), res.concurrency, res.num_gpus, est,
                f"batch {res.batch_size} x {max_length} tokens", kind, res)
    return pool, replica_bundles(name, res, est)


def replica_bundles(name: str, res: ResourcesConfig, est: Estimate) -> list[Bundle]:
    return [Bundle(res.num_gpus, res.num_cpus, [Member(name, r, est)]) for r in range(res.concurrency)]


def train_pool(ctx: Context, name: str, cfg: TrainConfig, head: str, tokens_per_example: int
               ) -> tuple[Pool, list[Bundle]]:
    """Ray Train's workers (train/loop.py): FSDP2 over the workers when there are two or more."""
    shape = ctx.shapes(cfg.model, f"{name}.model")
    gpus = cfg.gpus_per_worker if cfg.use_gpu else 0.0
    tokens = cfg.micro_batch_size * tokens_per_example
    if gpus > 0 and cfg.num_workers > 0:
        est = memory.trainable_replica(shape, head, max(1, cfg.num_workers), tokens,
                                       tokens if head == "lm" else 0, cfg.gradient_checkpointing,
                                       bf16=cfg.mixed_precision != "fp32")
    else:
        est = Estimate(note="CPU")
    ckpt = "activation checkpointing" if cfg.gradient_checkpointing else "no activation checkpointing"
    pool = Pool(f"{name} workers", label(shape, head), cfg.num_workers, gpus, est,
                f"FSDP2 over {cfg.num_workers}, micro-batch {cfg.micro_batch_size} x {tokens_per_example} tokens, {ckpt}",
                "train", cfg)
    bundles = [Bundle(gpus, cfg.cpus_per_worker, [Member(pool.name, r, est)], group=f"{name} workers")
               for r in range(cfg.num_workers)]
    return pool, bundles


def label(shape: ModelShape, head: str) -> str:
    return f"{shape.name} ({shape.params(head) / 1e9:.2f} B)"


# ------------------------------------------------------------------------------------------- the stages
def queries(ctx: Context) -> StagePlan:
    q, problems = ctx.cfg.queries, []
    phase = Phase()
    phase.add(*generation_pool(ctx, "queries", q.model, q.resources, q.sampling.max_new_tokens, problems))
    return StagePlan("queries", [phase], problems)


def compare(ctx: Context) -> StagePlan:
    c, problems, phases = ctx.cfg.compare, [], []
    groups: dict[str, list] = {}
    for rung in c.ladder:  # rungs with the same model and resources share a pool (synth/compare.py)
        groups.setdefault(rung.model.model_dump_json() + rung.resources.model_dump_json(), []).append(rung)
    for rungs in groups.values():
        phase = Phase()
        name = f"compare.ladder[{'+'.join(r.name.split('-')[0] for r in rungs)}]"
        phase.add(*generation_pool(ctx, name, rungs[0].model, rungs[0].resources,
                                   max(r.sampling.max_new_tokens for r in rungs), problems))
        phases.append(phase)
    if c.as_is_rm is not None:
        rm = c.as_is_rm
        phase = Phase()
        phase.add(*reward_pool(ctx, "compare.as_is_rm", ctx.shapes(rm.ref, "compare.as_is_rm.ref"), rm.dtype,
                               rm.max_length, rm.resources))
        phases.append(phase)
    return StagePlan("compare", phases, problems)


def train_rm(ctx: Context) -> StagePlan:
    t = ctx.cfg.train_rm
    phase = Phase()
    phase.add(*train_pool(ctx, "train_rm", t, "score", 2 * t.max_length))  # both replies of every pair
    return StagePlan("train_rm", [phase])


def train_sft(ctx: Context) -> StagePlan:
    t = ctx.cfg.train_sft
    phase = Phase()
    phase.add(*train_pool(ctx, "train_sft", t, "lm", t.max_length))
    return StagePlan("train_sft", [phase])


def rm_shape(ctx: Context) -> ModelShape:
    """The RM `train_rm` makes: its base model with a score head."""
    return ctx.shapes(ctx.cfg.train_rm.model, "train_rm.model")


def eval_rm(ctx: Context) -> StagePlan:
    e = ctx.cfg.eval_rm
    shape = ctx.shapes(e.model, "eval_rm.model") if e.model else rm_shape(ctx)
    phase = Phase()
    phase.add(*reward_pool(ctx, "eval_rm", shape, "auto", e.max_length, e.resources))
    return StagePlan("eval_rm", [phase])


def rmsp(ctx: Context) -> StagePlan:
    r, problems = ctx.cfg.rmsp, []
    pools = [generation_pool(ctx, "rmsp.assistant", r.assistant.model, r.assistant.resources,
                             r.assistant.sampling.max_new_tokens, problems, kind="replica_set")]
    if r.max_turns > 1 and not (r.assistant.model == r.user.model and r.assistant.resources == r.user.resources):
        pools.append(generation_pool(ctx, "rmsp.user", r.user.model, r.user.resources,
                                     r.user.sampling.max_new_tokens, problems, kind="replica_set"))
    if r.reward_model is not None:
        rm = r.reward_model
        shape = ctx.shapes(rm.ref, "rmsp.reward_model.ref") if rm.ref else rm_shape(ctx)
        pools.append(reward_pool(ctx, "rmsp.reward_model", shape, rm.dtype, rm.max_length, rm.resources,
                                 kind="replica_set"))
    phase = Phase()
    for pool, bundles in pools:
        phase.add(pool, bundles)
    return StagePlan("rmsp", [phase], problems, alone_if_crowded=True)


def ppo_uses_vllm(p) -> bool:
    """Whether the PPO engines are vLLM engines on the GPU cluster planned for: `backend: vllm`, or `auto`
    with GPUs (auto is vLLM wherever the `[gpu]` extra is installed, `rl.rollout.backend`)."""
    return p.rollout.backend == "vllm" or (p.rollout.backend == "auto" and p.rollout.num_gpus > 0)


def ppo(ctx: Context) -> StagePlan:
    """PPO's roles and engines, all at once, as `rl.trainer.start_roles` reserves them."""
    p, problems = ctx.cfg.ppo, []
    policy = ctx.shapes(p.policy, "ppo.policy") if p.policy else ctx.shapes(ctx.cfg.train_sft.model, "train_sft.model")
    reward = ctx.shapes(p.reward_model, "ppo.reward_model") if p.reward_model else rm_shape(ctx)
    vllm = ppo_uses_vllm(p)
    try:
        bundles, where = plan_bundles(p, separate_engines=vllm)
    except ConfigError as err:
        return StagePlan("ppo", [], [str(err)])
    seq = p.max_prompt_tokens + p.max_new_tokens
    tokens, rows = p.micro_batch_size * seq, p.micro_batch_size * p.max_new_tokens
    dtype = DTYPE_BYTES["bfloat16" if p.dtype == "auto" else p.dtype]
    ckpt = "activation checkpointing" if p.gradient_checkpointing else "no activation checkpointing"
    roles = {
        "policy": (policy, "lm", True),
        "critic": (reward if p.critic_init == "reward" else policy, "score", True),
        "reference": (policy, "lm", False),
        "reward": (reward, "score", False),
    }
    estimates: dict[str, Estimate] = {}
    phase = Phase()
    for role, (shape, head, trainable) in roles.items():
        if role not in where:  # a critic-free estimator has no critic
            continue
        res = p.resources(role)
        shards = res.replicas if p.sharded(role) else 1
        if res.num_gpus <= 0:
            est = Estimate(note="CPU")
        elif trainable:
            est = memory.trainable_replica(shape, head, shards, tokens, rows if head == "lm" else 0,
                                           p.gradient_checkpointing, bf16=p.bf16_compute("cuda"))
        else:
            est = memory.frozen_replica(shape, head, dtype, shards, tokens, rows if head == "lm" else 0)
        estimates[role] = est
        how = (f"FSDP2 over {shards}, {ckpt}" if trainable else f"{'FSDP2 over ' + str(shards) if shards > 1 else 'whole'}"
               f" in {p.dtype}")
        phase.pools.append(Pool(f"ppo.{role}", label(shape, head), res.replicas, res.num_gpus, est,
                                f"{how}, micro-batch {p.micro_batch_size} x {seq} tokens", "ppo", p))
    engine_est = (memory.vllm_replica(policy, p.rollout.tensor_parallel_size, p.rollout.gpu_memory_utilization,
                                      ctx.gpu_bytes, seq, dtype) if vllm else
                  memory.frozen_replica(policy, "lm", dtype, 1, p.rollout.max_batch_size * seq,
                                        p.rollout.max_batch_size) if p.rollout.num_gpus > 0 else Estimate(note="CPU"))
    tp = p.rollout.tensor_parallel_size if vllm else 1
    phase.pools.append(Pool("ppo.rollout", label(policy, "lm"), p.rollout.engines, tp if vllm else p.rollout.num_gpus,
                            engine_est, f"{'vLLM' if vllm else 'HF'} engines{f', TP {tp}' if tp > 1 else ''}", "ppo", p))
    for index, bundle in enumerate(bundles):
        members = [Member(f"ppo.{role}", ranks.index(index), estimates[role] if role != ROLLOUT else engine_est)
                   for role, ranks in where.items() if index in ranks]
        phase.bundles.append(Bundle(bundle.get("GPU", 0.0), bundle.get("CPU", 0.0), members, group="ppo roles"))
    if vllm:  # each engine's own placement group, as `rl.roles.reserve` makes it
        for engine in range(p.rollout.engines):
            for rank, bundle in enumerate(engine_bundles(p)):
                member = Member("ppo.rollout", engine * tp + rank, engine_est)
                phase.bundles.append(Bundle(bundle["GPU"], bundle["CPU"], [member], group=f"ppo engine {engine}"))
    return StagePlan("ppo", [phase], problems)


def eval_stage(ctx: Context) -> StagePlan:
    """The evaluated models (base, SFT, PPO: one after another, the base model's shape) and the judge (the
    pipeline's eval stage judges PPO against SFT when question sets are configured), all in `eval.resources`
    pools."""
    e, problems, phases = ctx.cfg.eval, [], []
    evaluated = e.model.model_copy(update={"ref": ctx.cfg.train_sft.model})
    phase = Phase()
    phase.add(*generation_pool(ctx, "eval.model", evaluated, e.resources, 0, problems, "eval.resources"))
    phases.append(phase)
    if ("judge" in e.suites or e.judge.questions) and e.judge.kind == "model":  # the pipeline judges PPO vs SFT
        phase = Phase()
        phase.add(*generation_pool(ctx, "eval.judge", e.judge.model, e.resources, 0, problems, "eval.resources"))
        phases.append(phase)
    return StagePlan("eval", phases, problems)


def report(ctx: Context) -> StagePlan:
    """The report's side-by-side answers: `generate` with the base, SFT and PPO models, one after another."""
    g, problems = ctx.cfg.generate, []
    model = g.model.model_copy(update={"ref": ctx.cfg.train_sft.model})
    phase = Phase()
    phase.add(*generation_pool(ctx, "generate (report)", model, g.resources, g.sampling.max_new_tokens, problems,
                               "generate.resources"))
    return StagePlan("report", [phase], problems)


STAGE_PLANS = {"queries": queries, "compare": compare, "train_rm": train_rm, "eval_rm": eval_rm, "rmsp": rmsp,
               "train_sft": train_sft, "ppo": ppo, "eval": eval_stage, "report": report}


def plan_stages(cfg: Config, gpu_bytes: float, model_configs: Path | None = None,
                only: list[str] | None = None) -> list[StagePlan]:
    """Every pipeline stage's plan (or those in `only`), in pipeline order."""
    ctx = Context(cfg, Shapes(model_configs), gpu_bytes)
    return [fn(ctx) for name, fn in STAGE_PLANS.items() if only is None or name in only]
