"""`almost-ray ppo --engine openrlhf`: our PPO config as an OpenRLHF 0.11.2 Ray job (ALMoST Section 2.3).

For GPU clusters larger than our own PPO is built for: the same run (SFT policy, synthetic RM, RMSP
prompts, the paper's hyper-parameters from `Config.ppo`) mapped onto `python -m
openrlhf.cli.train_ppo_ray` and submitted with Ray's Jobs SDK. Flags are OpenRLHF's dotted ones (since
0.10.2). They were read from the parser itself, in `openrlhf/cli/train_ppo_ray.py` of the PyPI wheel
`openrlhf-0.11.2-cp311-cp311-manylinux1_x86_64.whl` (sha256 c969d70db03a70724c3d8a5a01186c6e0728bce6
24fb3dff95e39b5396acefa6); the GitHub snapshot holds only up to tag v0.11.0 (commit 3c3be6234e0c),
whose parser defines every flag used here the same way (0.11.2 only adds `flash_reinforce` to the
estimator choices). Its README still shows `--prompt_max_len` /
`--generate_max_len`, which that parser rejects. `tests/test_rl_openrlhf.py` keeps the parser's
definitions of every flag emitted here and parses each command with them.

What OpenRLHF 0.11.2 does with the values (read in the same wheel), where it matters for the mapping:
- one "global step" is one rollout batch of `--rollout.batch_size` prompts x `n_samples_per_prompt`,
  then `--train.max_epochs` passes in optimizer steps of `--train.batch_size` samples; `--ckpt.save_steps`
  counts global steps, i.e. our iterations; our `rollout_batch_size` counts samples, so
  `--rollout.batch_size` is our `prompts_per_iteration`;
- `--train.num_episodes` is passes over the prompt dataset (shuffled with `--train.seed`), so the
  prompts file holds our `iterations x prompts_per_iteration` prompts (cycled) and one pass;
- GAE advantages are always whitened (mean, and std unless `--algo.advantage.no_std_norm`), rewards are
  clipped to `--reward.clip_range` (default +-10) and generation is vLLM only;
- `--algo.advantage.estimator` other than `gae` starts no critic (its flags are left out here), and the
  advantages are ours of `rl/losses.py` under OpenRLHF's names (`OPENRLHF_ESTIMATOR`); `--algo.kl.use_loss`
  is our `use_kl_loss`. Its default policy-loss aggregation, `--actor.loss_agg_mode token-mean`, is ours.
Options that do not map are either a `ConfigError` (they would change what is trained) or listed in
`UNMAPPED` (they change only where or how fast it runs); see docs/openrlhf.md.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import NamedTuple

from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import write_json
from almost_ray.data.records import write_jsonl
from almost_ray.models.loading import load_tokenizer, resolve_model_dir
from almost_ray.prompts.templates import render_prompt
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.prompt_data import load_prompts
from almost_ray.runs import paths

OPENRLHF_VERSION = "0.11.2"
ENTRYPOINT = ["python", "-m", "openrlhf.cli.train_ppo_ray"]
# openrlhf 0.11.2's own pins (its wheel's Requires-Dist; vllm from its `vllm` extra).
RUNTIME_PINS = [
    f"openrlhf=={OPENRLHF_VERSION}",
    "vllm==0.29.0",
    "ray[default]==2.55.0",
    "transformers==5.15.0",
    "deepspeed==0.19.6",
    "flash-attn==2.8.3",
]
# train_ppo_ray's ray.init(runtime_env={"env_vars": ...}) keys: a job runtime_env must not set them
OPENRLHF_DRIVER_ENV_VARS = ("TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")
INPUT_KEY = "input"  # --data.input_key's default; the column write_prompts writes
VALUE_HEAD = "score"  # the head of transformers' *ForSequenceClassification, i.e. of our train-rm output
NO_REWARD_CLIP = 10000.0  # the paper clips no reward; OpenRLHF's default range is (-10, 10)
OPENRLHF_ROLE = {"policy": "actor", "critic": "critic", "reference": "ref", "reward": "reward"}
# our advantage estimator -> OpenRLHF 0.11.2's (experience_maker.compute_advantages_and_returns computes the same)
OPENRLHF_ESTIMATOR = {"gae": "gae", "grpo": "group_norm", "dr_grpo": "dr_grpo", "rloo": "rloo",
                      "reinforce_pp": "reinforce"}
UNMAPPED = {
    "placement_strategy": "OpenRLHF packs each role (or colocated group) into its own PACK placement group",
    "*_resources.num_cpus": "OpenRLHF reserves one CPU per GPU bundle",
    "*_resources.num_gpus": "OpenRLHF gives each replica one GPU (a 0.2 share of a bundle when colocated)",
    "rollout.num_cpus": "each vLLM engine reserves its tensor_parallel_size GPUs",
    "rollout.num_gpus": "each vLLM engine reserves its tensor_parallel_size GPUs",
    "rollout.max_batch_size": "HF generator only; vLLM batches continuously",
    "rollout.torch_threads": "HF generator only (CPU threads)",
    "torch_threads": "CPU threads of our role actors; OpenRLHF's roles run on GPUs",
    "old_logprobs": "OpenRLHF recomputes pi_old with the actor (our `old_logprobs: policy`)",
    "mixed_precision": "OpenRLHF computes in bf16 (`--ds.param_dtype bf16`)",
    "value_loss_coef": "OpenRLHF trains the critic with its own AdamW; the coefficient would only rescale "
    "the critic's gradient, which Adam undoes (up to eps and gradient clipping)",
}


def stage_dir(cfg: Config) -> Path:
    """`runs.paths.openrlhf_dir`, absolute: every node of the cluster reads it."""
    return paths.openrlhf_dir(cfg).resolve()


def model_dirs(cfg: Config) -> tuple[str, str]:
    """(policy, reward model) directories: `ppo.policy`/`ppo.reward_model`, else the SFT and RM stages'.

    Embedded, `tiny:` and `.gguf` references are converted to a cached HF directory first; a plain
    directory is only made absolute (it must exist at the same path on every node of the cluster).
    """
    return _hf_dir(paths.ppo_policy(cfg)), _hf_dir(paths.ppo_reward_model(cfg))


def _hf_dir(ref: str) -> str:
    if ref.startswith(("embedded:", "tiny:")) or ref.endswith(".gguf"):

        return str(resolve_model_dir(ref).resolve())
    return str(Path(ref).expanduser().resolve())


def prompt_rows(cfg: PPOConfig) -> int:
    """Rows of the prompts file: the prompts our stage draws (`iterations` rollout batches of
    `prompts_per_iteration`; each is sampled `n_samples_per_prompt` times)."""
    return cfg.iterations * cfg.prompts_per_iteration


def role_placement(replicas: int, gpus_per_node: int, role: str) -> tuple[int, int]:
    """(num_nodes, num_gpus_per_node) of `replicas` one-GPU actors, at most `gpus_per_node` per node."""
    if replicas <= gpus_per_node:
        return 1, replicas
    if replicas % gpus_per_node:
        raise ConfigError(
            f"ppo.{role}_resources.replicas: {replicas} does not fill whole nodes of "
            f"ppo.openrlhf.gpus_per_node={gpus_per_node} (OpenRLHF places num_nodes x num_gpus_per_node GPUs)"
        )
    return replicas // gpus_per_node, gpus_per_node


def colocation_flags(cfg: PPOConfig) -> list[str]:
    """Our `colocate` groups as OpenRLHF's three colocation switches (the only groupings it has); a
    critic-free run has no critic, so all its roles together are `colocate_all`."""
    flags = []
    for group in cfg.colocate:
        roles = set(group) & set(cfg.roles)
        if len(roles) < 2:
            continue
        if roles == set(cfg.roles):
            flag = "--train.colocate_all"
        elif roles == {"policy", "reference"}:
            flag = "--train.colocate_actor_ref"
        elif roles == {"critic", "reward"}:
            flag = "--train.colocate_critic_reward"
        else:
            raise ConfigError(
                f"ppo.colocate: {sorted(roles)} has no OpenRLHF equivalent; OpenRLHF 0.11.2 colocates "
                "[policy, reference], [critic, reward] or all four roles"
            )
        sizes = {r: cfg.resources(r).replicas for r in roles}
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"ppo.colocate: colocated roles need the same replicas in OpenRLHF, got {sizes}")
        flags.append(flag)
    return flags


def check_mappable(cfg: PPOConfig) -> None:
    """Raise for settings OpenRLHF 0.11.2 cannot reproduce (they would change what is trained)."""
    problems = []
    if cfg.rollout.backend == "hf":
        problems.append("rollout.backend: hf -- OpenRLHF 0.11.2 generates with vLLM engines only (use auto/vllm)")
    if cfg.dtype == "float32":
        problems.append("dtype: float32 -- OpenRLHF trains in bf16 or fp16 only (use auto/bfloat16)")
    if not cfg.whiten_advantages and not cfg.critic_free:
        problems.append("whiten_advantages: false -- OpenRLHF always centres GAE advantages")
    if cfg.missing_eos_penalty is not None:
        problems.append(
            "missing_eos_penalty -- OpenRLHF's --reward.stop_properly_penalty_coef scales or replaces the reward "
            "of a truncated response; it cannot add a penalty to the RM score"
        )
    if problems:
        raise ConfigError("ppo: not mappable onto OpenRLHF 0.11.2:\n  " + "\n  ".join(problems))


def unmapped_settings(cfg: PPOConfig) -> list[str]:
    """The settings of `cfg` that differ from the defaults but OpenRLHF ignores, with the reason."""
    default = PPOConfig()
    found = []
    if cfg.placement_strategy != default.placement_strategy:
        found.append(f"placement_strategy={cfg.placement_strategy}: {UNMAPPED['placement_strategy']}")
    for name in ("value_loss_coef", "torch_threads", "old_logprobs", "mixed_precision"):
        if getattr(cfg, name) != getattr(default, name):
            found.append(f"{name}={getattr(cfg, name)}: {UNMAPPED[name]}")
    for name in ("num_cpus", "num_gpus", "max_batch_size", "torch_threads"):
        if getattr(cfg.rollout, name) != getattr(default.rollout, name):
            found.append(f"rollout.{name}={getattr(cfg.rollout, name)}: {UNMAPPED[f'rollout.{name}']}")
    return found


def _num(x: float | int) -> str:
    return str(x) if isinstance(x, int) else repr(float(x))


def build_command(cfg: Config) -> list[str]:
    """The argv after `python -m openrlhf.cli.train_ppo_ray` for `cfg.ppo` (see the module docstring)."""
    p = cfg.ppo
    check_mappable(p)
    policy, reward = model_dirs(cfg)
    out = stage_dir(cfg)
    n_engines, tp = p.rollout.engines, p.rollout.tensor_parallel_size
    colocation = colocation_flags(p)
    policy_gpus = p.policy_resources.replicas
    if "--train.colocate_all" in colocation and n_engines * tp != policy_gpus:
        raise ConfigError(
            f"ppo.rollout: colocating all roles needs engines x tensor_parallel_size == policy replicas "
            f"(OpenRLHF shares the actor's GPUs with vLLM), got {n_engines} x {tp} != {policy_gpus}"
        )
    if p.rollout_batch_size // p.micro_batch_size < policy_gpus:
        raise ConfigError(
            f"ppo.micro_batch_size: rollout_batch_size / micro_batch_size = {p.rollout_batch_size // p.micro_batch_size}"
            f" micro-batches, fewer than the {policy_gpus} policy replicas (OpenRLHF asserts this)"
        )
    argv = [
        "--actor.model_name_or_path", policy,
        "--reward.model_name_or_path", reward,
        *([] if p.critic_free else ["--critic.model_name_or_path", reward if p.critic_init == "reward" else policy]),
        "--ds.value_head_prefix", VALUE_HEAD,
        "--data.prompt_dataset", str(out / "prompts.jsonl"),
        "--data.input_key", INPUT_KEY,
        *(["--data.apply_chat_template"] if p.prompt_format == "chat" else []),
        "--data.max_len", str(p.max_prompt_tokens + p.max_new_tokens),
        "--rollout.batch_size", str(p.prompts_per_iteration),
        "--rollout.n_samples_per_prompt", str(p.n_samples_per_prompt),
        "--rollout.micro_batch_size", str(p.micro_batch_size),
        "--rollout.max_new_tokens", str(p.max_new_tokens),
        "--rollout.temperature", _num(p.temperature),
        "--rollout.top_p", _num(p.top_p),
        "--train.batch_size", str(p.minibatch_size),
        "--train.micro_batch_size", str(p.micro_batch_size),
        "--train.max_epochs", str(p.ppo_epochs),
        "--train.num_episodes", "1",
        "--train.seed", str(p.seed),
        "--algo.advantage.estimator", OPENRLHF_ESTIMATOR[p.advantage_estimator],
        "--algo.advantage.gamma", _num(p.gamma),
        "--algo.advantage.lambd", _num(p.lam),
        "--algo.kl.init_coef", _num(p.kl_coef),
        "--algo.kl.estimator", p.kl_estimator,
        *(["--algo.kl.use_loss"] if p.use_kl_loss else []),
        "--actor.eps_clip", _num(p.clip_range),
        *([] if p.critic_free else ["--critic.value_clip", _num(p.clip_range_value)]),
        "--reward.clip_range", _num(-NO_REWARD_CLIP), _num(NO_REWARD_CLIP),
    ]
    optimizers = [("actor", p.lr)] + ([] if p.critic_free else [("critic", p.critic_lr)])
    for prefix, lr in optimizers:
        argv += [
            f"--{prefix}.adam.lr", _num(lr),
            f"--{prefix}.adam.betas", _num(p.adam_betas[0]), _num(p.adam_betas[1]),
            f"--{prefix}.adam.weight_decay", _num(p.weight_decay),
            f"--{prefix}.lr_warmup_ratio", "0.0",
            f"--{prefix}.min_lr_ratio", _num(p.min_lr / p.lr),
            f"--{prefix}.max_norm", _num(p.max_grad_norm or 0.0),  # 0: DeepSpeed clips nothing
        ]
    argv += ["--ds.param_dtype", "bf16", *(["--ds.packing_samples"] if p.padding_free else [])]
    for role in p.roles:
        nodes, gpus = role_placement(p.resources(role).replicas, p.openrlhf.gpus_per_node, role)
        name = OPENRLHF_ROLE[role]
        argv += [f"--{name}.num_nodes", str(nodes), f"--{name}.num_gpus_per_node", str(gpus)]
    argv += colocation
    argv += [
        "--vllm.num_engines", str(n_engines),
        "--vllm.tensor_parallel_size", str(tp),
        "--vllm.gpu_memory_utilization", _num(p.rollout.gpu_memory_utilization),
    ]
    if "--train.colocate_all" in colocation:
        argv += ["--vllm.enable_sleep", "--ds.enable_sleep"]
    argv += [
        "--ckpt.path", str(out / "checkpoints"),
        "--ckpt.save_steps", str(p.checkpoint_every),
        "--ckpt.max_num", str(p.checkpoints_to_keep),
        "--ckpt.save_hf",
        "--ckpt.load_enable",
        "--ckpt.output_dir", str(out / "model"),
        "--logger.tensorboard_dir", str(out / "tensorboard"),
    ]
    return argv


def runtime_env(cfg: Config) -> dict:
    """The job's own environment: OpenRLHF's pins by pip, or a container image that has them.

    Ray refuses a runtime_env that changes the Ray version, so either way the cluster itself must run
    ray 2.55.0 (OpenRLHF's pin), not our 2.60. No `env_vars`: OpenRLHF's driver calls `ray.init` with its
    own (`OPENRLHF_DRIVER_ENV_VARS`), and Ray refuses to merge a job runtime_env that sets any of the same
    keys; set those in the environment of `ray job submit`'s cluster instead.
    """
    if cfg.ppo.openrlhf.image_uri:
        return {"image_uri": cfg.ppo.openrlhf.image_uri}
    return {"pip": {"packages": list(RUNTIME_PINS), "pip_check": False}}


class PromptsWritten(NamedTuple):
    rows: int  # prompts in the file (cycled to the ones the run draws)
    prompts: int  # distinct prompts kept
    dropped: int  # prompts longer than ppo.max_prompt_tokens


def write_prompts(cfg: Config, path: Path) -> PromptsWritten:
    """The prompts file OpenRLHF reads: JSONL rows `{"input": prompt}`, one per prompt drawn.

    `human_assistant`/`tulu` prompts are rendered here (OpenRLHF then uses the text as is);
    `chat` prompts stay raw and `--data.apply_chat_template` renders them. Prompts whose rendered
    tokens exceed `max_prompt_tokens` are dropped, as our stage drops them.
    """

    texts = load_prompts(paths.ppo_prompts(cfg))
    tokenizer = load_tokenizer(model_dirs(cfg)[0])
    kept = []
    for text in texts:
        rendered = render_prompt(cfg.ppo.prompt_format, [{"role": "user", "content": text}], tokenizer)
        if len(tokenizer(rendered, add_special_tokens=False).input_ids) <= cfg.ppo.max_prompt_tokens:
            kept.append(text if cfg.ppo.prompt_format == "chat" else rendered)
    if not kept:
        raise ConfigError(f"ppo.max_prompt_tokens: all {len(texts)} prompts are longer than {cfg.ppo.max_prompt_tokens} tokens")
    rows = prompt_rows(cfg.ppo)
    write_jsonl(path, ({INPUT_KEY: kept[i % len(kept)]} for i in range(rows)))
    return PromptsWritten(rows, len(kept), len(texts) - len(kept))


def check_reward_model(path: str | Path) -> None:
    """Our RM loads as OpenRLHF's reward model: a one-output `*ForSequenceClassification` whose head is
    `score` (OpenRLHF builds base model + `score` Linear(hidden, 1, bias=False), the same tensors)."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: reward model not found (no config.json); run `almost-ray train-rm` or set ppo.reward_model")
    config = json.loads(config_file.read_text())
    arch = (config.get("architectures") or ["?"])[0]
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not arch.endswith("ForSequenceClassification") or labels != 1:
        raise ConfigError(f"{config_file}: expected a one-output *ForSequenceClassification RM, got {arch} with {labels} labels")
    head = config.get("value_head_prefix", VALUE_HEAD)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        keys = set()
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                keys |= set(f.keys())
    if f"{head}.weight" not in keys:
        raise ConfigError(f"{path}: no '{head}.weight' tensor; OpenRLHF reads the RM's value head by that name")


def submit_argv(address: str | None, env: dict, argv: list[str]) -> list[str]:
    """The `ray job submit` command line equivalent to what `launch` submits."""
    head = ["ray", "job", "submit"] + (["--address", address] if address else [])
    return head + ["--runtime-env-json", json.dumps(env, sort_keys=True), "--", *ENTRYPOINT, *argv]


def launch(cfg: Config, dry_run: bool) -> int:
    """Print (`dry_run`) or submit OpenRLHF's PPO job for `cfg`; returns the exit code.

    A dry run writes nothing and needs no cluster. A real launch checks the models, writes the prompts
    file and submits to `ray.address` or `RAY_ADDRESS` (the dashboard address, e.g.
    http://head:8265) with the Jobs SDK, then records the job in `<stage dir>/job.json`.
    """
    argv = build_command(cfg)
    env = runtime_env(cfg)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    out = stage_dir(cfg)
    notes = [f"not mapped: {line}" for line in unmapped_settings(cfg.ppo)]
    if dry_run:
        print(shlex.join(submit_argv(address, env, argv)))
        print(json.dumps(env, indent=2, sort_keys=True))
        if not address:
            notes.append("no ray.address: `ray job submit` reads RAY_ADDRESS")
        notes.append(f"a real launch first writes {out / 'prompts.jsonl'} ({prompt_rows(cfg.ppo)} prompts, "
                     f"{cfg.ppo.n_samples_per_prompt} sample(s) each)")
        print("\n".join(f"# {n}" for n in notes))
        return 0
    if not address:
        raise ConfigError(
            "ray.address: no Ray cluster to submit OpenRLHF to; set ray.address or RAY_ADDRESS to its "
            "dashboard (e.g. http://head:8265)"
        )
    policy, reward = model_dirs(cfg)
    if not (Path(policy) / "config.json").is_file():
        raise ConfigError(f"{policy}: policy (SFT model) not found; run `almost-ray train-sft` or set ppo.policy")
    check_reward_model(reward)
    written = write_prompts(cfg, out / "prompts.jsonl")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(ENTRYPOINT + argv),
        runtime_env=env,
        metadata={"run": cfg.run_name, "stage": "ppo", "engine": f"openrlhf=={OPENRLHF_VERSION}"},
    )
    write_json(out / "job.json", {"job_id": job_id, "address": address, "argv": argv, "runtime_env": env,
                                  "prompts": written._asdict()})
    for n in notes:
        print(f"# {n}")
    print(f"prompts: {written.prompts} kept, {written.dropped} too long, {written.rows} rows of "
          f"{cfg.ppo.n_samples_per_prompt} sample(s) each")
    print(f"submitted OpenRLHF PPO job {job_id}; follow it with: ray job logs --follow --address {address} {job_id}")
    return 0

