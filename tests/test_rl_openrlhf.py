"""The OpenRLHF 0.11.2 launcher: the exact command for a config, its prompts file, dry run and submit.

`OPENRLHF_FLAGS` is the golden reference: how OpenRLHF 0.11.2's own parser
(`openrlhf/cli/train_ppo_ray.py` of the PyPI wheel, see `almost_ray/rl/openrlhf.py`) defines every flag
the launcher emits: `store_true`, a type, or a type with `nargs=2`, and the choices it accepts. Each
command is parsed with a parser rebuilt from it, so a renamed flag, a value for a switch, a wrong
arity or a choice OpenRLHF rejects fails here.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from almost_ray.config import Config, load_config
from almost_ray.config_base import ConfigError
from almost_ray.rl import openrlhf

ROOT = Path(__file__).resolve().parents[1]

OPENRLHF_FLAGS: dict[str, tuple[str, list[str] | None]] = {
    "--actor.adam.betas": ("floatx2", None),
    "--actor.adam.lr": ("float", None),
    "--actor.adam.weight_decay": ("float", None),
    "--actor.eps_clip": ("float", None),
    "--actor.lr_warmup_ratio": ("float", None),
    "--actor.max_norm": ("float", None),
    "--actor.min_lr_ratio": ("float", None),
    "--actor.model_name_or_path": ("str", None),
    "--actor.num_gpus_per_node": ("int", None),
    "--actor.num_nodes": ("int", None),
    "--algo.advantage.estimator": (
        "str", ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"]
    ),
    "--algo.advantage.gamma": ("float", None),
    "--algo.advantage.lambd": ("float", None),
    "--algo.kl.estimator": ("str", ["k1", "k2", "k3"]),
    "--algo.kl.init_coef": ("float", None),
    "--algo.kl.use_loss": ("store_true", None),
    "--ckpt.load_enable": ("store_true", None),
    "--ckpt.max_num": ("int", None),
    "--ckpt.output_dir": ("str", None),
    "--ckpt.path": ("str", None),
    "--ckpt.save_hf": ("store_true", None),
    "--ckpt.save_steps": ("int", None),
    "--critic.adam.betas": ("floatx2", None),
    "--critic.adam.lr": ("float", None),
    "--critic.adam.weight_decay": ("float", None),
    "--critic.lr_warmup_ratio": ("float", None),
    "--critic.max_norm": ("float", None),
    "--critic.min_lr_ratio": ("float", None),
    "--critic.model_name_or_path": ("str", None),
    "--critic.num_gpus_per_node": ("int", None),
    "--critic.num_nodes": ("int", None),
    "--critic.value_clip": ("float", None),
    "--data.apply_chat_template": ("store_true", None),
    "--data.input_key": ("str", None),
    "--data.max_len": ("int", None),
    "--data.prompt_dataset": ("str", None),
    "--ds.enable_sleep": ("store_true", None),
    "--ds.packing_samples": ("store_true", None),
    "--ds.param_dtype": ("str", ["bf16", "fp16"]),
    "--ds.value_head_prefix": ("str", None),
    "--logger.tensorboard_dir": ("str", None),
    "--ref.num_gpus_per_node": ("int", None),
    "--ref.num_nodes": ("int", None),
    "--reward.clip_range": ("floatx2", None),
    "--reward.model_name_or_path": ("str", None),
    "--reward.num_gpus_per_node": ("int", None),
    "--reward.num_nodes": ("int", None),
    "--rollout.batch_size": ("int", None),
    "--rollout.max_new_tokens": ("int", None),
    "--rollout.micro_batch_size": ("int", None),
    "--rollout.n_samples_per_prompt": ("int", None),
    "--rollout.temperature": ("float", None),
    "--rollout.top_p": ("float", None),
    "--train.batch_size": ("int", None),
    "--train.colocate_actor_ref": ("store_true", None),
    "--train.colocate_all": ("store_true", None),
    "--train.colocate_critic_reward": ("store_true", None),
    "--train.max_epochs": ("int", None),
    "--train.micro_batch_size": ("int", None),
    "--train.num_episodes": ("int", None),
    "--train.seed": ("int", None),
    "--vllm.enable_sleep": ("store_true", None),
    "--vllm.gpu_memory_utilization": ("float", None),
    "--vllm.num_engines": ("int", None),
    "--vllm.tensor_parallel_size": ("int", None),
}


def parse_as_openrlhf(argv: list[str]) -> dict:
    """Parse `argv` with the golden definitions, as OpenRLHF's argparse would (it exits on an unknown flag)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag, (kind, choices) in OPENRLHF_FLAGS.items():
        if kind == "store_true":
            parser.add_argument(flag, action="store_true")
        else:
            typ = {"int": int, "float": float, "str": str}[kind.split("x")[0]]
            parser.add_argument(flag, type=typ, choices=choices, nargs=2 if kind.endswith("x2") else None)
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"flags OpenRLHF 0.11.2 does not define: {unknown}"
    return vars(args)


def paper_config(**ppo) -> Config:
    """The paper's PPO numbers (ALMoST Appendix D.3) on 8-GPU nodes, with explicit directories."""
    section = {
        "policy": "/models/sft", "reward_model": "/models/rm", "prompt_format": "human_assistant",
        "total_episodes": 80_000, "rollout_batch_size": 512, "minibatch_size": 32, "micro_batch_size": 4,
        "ppo_epochs": 4, "max_new_tokens": 128, "max_prompt_tokens": 512, "temperature": 1.0, "top_p": 1.0,
        "kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "clip_range": 0.2,
        "clip_range_value": 0.2, "lr": 1e-6, "min_lr": 8e-7, "critic_lr": 5e-6, "adam_betas": [0.9, 0.95],
        "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 1,
        "policy_resources": {"replicas": 8, "num_gpus": 0.5}, "reference_resources": {"replicas": 8, "num_gpus": 0.5},
        "critic_resources": {"replicas": 8, "num_gpus": 0.5}, "reward_resources": {"replicas": 8, "num_gpus": 0.5},
        "colocate": [["policy", "reference"], ["critic", "reward"]],
        "rollout": {"backend": "vllm", "engines": 4, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.6},
        "checkpoint_every": 10, "checkpoints_to_keep": 2, "openrlhf": {"gpus_per_node": 8},
    }
    section.update(ppo)
    return Config.model_validate({"run_name": "paper", "runs_dir": "/shared/runs", "ppo": section})


def test_golden_command_for_the_papers_settings():
    stage = "/shared/runs/paper/ppo_openrlhf"
    assert openrlhf.build_command(paper_config()) == [
        "--actor.model_name_or_path", "/models/sft",
        "--reward.model_name_or_path", "/models/rm",
        "--critic.model_name_or_path", "/models/rm",
        "--ds.value_head_prefix", "score",
        "--data.prompt_dataset", f"{stage}/prompts.jsonl",
        "--data.input_key", "input",
        "--data.max_len", "640",
        "--rollout.batch_size", "512",
        "--rollout.n_samples_per_prompt", "1",
        "--rollout.micro_batch_size", "4",
        "--rollout.max_new_tokens", "128",
        "--rollout.temperature", "1.0",
        "--rollout.top_p", "1.0",
        "--train.batch_size", "32",
        "--train.micro_batch_size", "4",
        "--train.max_epochs", "4",
        "--train.num_episodes", "1",
        "--train.seed", "1",
        "--algo.advantage.estimator", "gae",
        "--algo.advantage.gamma", "1.0",
        "--algo.advantage.lambd", "0.95",
        "--algo.kl.init_coef", "0.05",
        "--algo.kl.estimator", "k1",
        "--actor.eps_clip", "0.2",
        "--critic.value_clip", "0.2",
        "--reward.clip_range", "-10000.0", "10000.0",
        "--actor.adam.lr", "1e-06",
        "--actor.adam.betas", "0.9", "0.95",
        "--actor.adam.weight_decay", "0.0",
        "--actor.lr_warmup_ratio", "0.0",
        "--actor.min_lr_ratio", "0.8",
        "--actor.max_norm", "1.0",
        "--critic.adam.lr", "5e-06",
        "--critic.adam.betas", "0.9", "0.95",
        "--critic.adam.weight_decay", "0.0",
        "--critic.lr_warmup_ratio", "0.0",
        "--critic.min_lr_ratio", "0.8",
        "--critic.max_norm", "1.0",
        "--ds.param_dtype", "bf16",
        "--ds.packing_samples",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "8",
        "--critic.num_nodes", "1", "--critic.num_gpus_per_node", "8",
        "--ref.num_nodes", "1", "--ref.num_gpus_per_node", "8",
        "--reward.num_nodes", "1", "--reward.num_gpus_per_node", "8",
        "--train.colocate_actor_ref",
        "--train.colocate_critic_reward",
        "--vllm.num_engines", "4",
        "--vllm.tensor_parallel_size", "2",
        "--vllm.gpu_memory_utilization", "0.6",
        "--ckpt.path", f"{stage}/checkpoints",
        "--ckpt.save_steps", "10",
        "--ckpt.max_num", "2",
        "--ckpt.save_hf",
        "--ckpt.load_enable",
        "--ckpt.output_dir", f"{stage}/model",
        "--logger.tensorboard_dir", f"{stage}/tensorboard",
    ]


def test_the_command_parses_with_openrlhfs_parser_and_keeps_the_values():
    args = parse_as_openrlhf(openrlhf.build_command(paper_config()))
    assert args["rollout.batch_size"] == 512 and args["train.batch_size"] == 32 and args["train.max_epochs"] == 4
    assert args["reward.clip_range"] == [-10000.0, 10000.0] and args["actor.adam.betas"] == [0.9, 0.95]
    assert args["actor.min_lr_ratio"] * 1e-6 == pytest.approx(8e-7)
    assert args["train.colocate_actor_ref"] and not args["train.colocate_all"] and args["ckpt.save_hf"]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_maps_to_flags_openrlhf_accepts(config):
    cfg = load_config(config, ["ppo.policy=/models/sft", "ppo.reward_model=/models/rm", "ppo.rollout.backend=vllm",
                               "ppo.dtype=auto", "ppo.whiten_advantages=true", "ppo.missing_eos_penalty=null"])
    parse_as_openrlhf(openrlhf.build_command(cfg))


def test_colocating_everything_shares_the_actor_gpus_with_vllm_and_chat_prompts_use_the_template():
    cfg = paper_config(colocate=[["policy", "reference", "critic", "reward"]], prompt_format="chat",
                       rollout={"engines": 4, "tensor_parallel_size": 2}, critic_init="policy")
    argv = openrlhf.build_command(cfg)
    args = parse_as_openrlhf(argv)
    assert args["train.colocate_all"] and args["vllm.enable_sleep"] and args["ds.enable_sleep"]
    assert args["data.apply_chat_template"] and args["critic.model_name_or_path"] == "/models/sft"
    with pytest.raises(ConfigError, match="engines x tensor_parallel_size == policy replicas"):
        openrlhf.build_command(paper_config(colocate=[["policy", "reference", "critic", "reward"]],
                                            rollout={"engines": 2, "tensor_parallel_size": 2}))


@pytest.mark.parametrize("ours, theirs", list(openrlhf.OPENRLHF_ESTIMATOR.items()))
def test_critic_free_estimators_map_to_openrlhfs_and_start_no_critic(ours, theirs):
    """OpenRLHF samples `--rollout.batch_size` prompts x `n_samples_per_prompt`: the same 512 samples per
    iteration as ours; without a critic, no critic flag is passed and all remaining roles colocate."""
    cfg = paper_config(advantage_estimator=ours, n_samples_per_prompt=8, use_kl_loss=ours == "grpo",
                       kl_estimator="k3" if ours == "grpo" else "k1",
                       colocate=[["policy", "reference", "critic", "reward"]],
                       rollout={"engines": 4, "tensor_parallel_size": 2})
    argv = openrlhf.build_command(cfg)
    args = parse_as_openrlhf(argv)
    assert args["algo.advantage.estimator"] == theirs
    assert args["rollout.batch_size"] * args["rollout.n_samples_per_prompt"] == 512
    assert args["rollout.n_samples_per_prompt"] == 8 and args["train.batch_size"] == 32
    assert args["algo.kl.use_loss"] == (ours == "grpo")
    critic_flags = [a for a in argv if a.startswith("--critic.") or a == "--train.colocate_critic_reward"]
    assert (critic_flags == []) == (ours != "gae")
    assert args["train.colocate_all"]  # policy, reference and reward: every role a critic-free run has


def test_critic_free_prompts_file_holds_one_row_per_prompt_drawn(tmp_path):
    cfg = tiny_run(tmp_path, advantage_estimator="rloo", n_samples_per_prompt=2, rollout_batch_size=4,
                   minibatch_size=2, total_episodes=8)
    written = openrlhf.write_prompts(cfg, tmp_path / "prompts.jsonl")
    assert written == (4, 2, 1)  # 2 iterations x 2 prompts, each sampled twice by OpenRLHF


def test_replicas_become_nodes_of_gpus_per_node():
    assert openrlhf.role_placement(3, 8, "policy") == (1, 3)
    assert openrlhf.role_placement(16, 8, "policy") == (2, 8)
    with pytest.raises(ConfigError, match=r"ppo.critic_resources.replicas: 12 does not fill whole nodes"):
        openrlhf.role_placement(12, 8, "critic")


@pytest.mark.parametrize("change, message", [
    ({"colocate": [["policy", "critic"]]}, r"\['critic', 'policy'\] has no OpenRLHF equivalent"),
    ({"reference_resources": {"replicas": 4}}, "colocated roles need the same replicas"),
    ({"rollout": {"backend": "hf"}}, "vLLM engines only"),
    ({"dtype": "float32"}, "bf16 or fp16 only"),
    ({"whiten_advantages": False}, "always centres GAE advantages"),
    ({"missing_eos_penalty": -1.0}, "stop_properly_penalty_coef"),
    ({"micro_batch_size": 128}, "fewer than the 8 policy replicas"),
])
def test_settings_openrlhf_cannot_reproduce_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        openrlhf.build_command(paper_config(**change))


def test_settings_openrlhf_ignores_are_listed():
    cfg = paper_config(placement_strategy="SPREAD", value_loss_coef=0.5).ppo
    found = openrlhf.unmapped_settings(cfg)
    assert [line.split(":")[0] for line in found] == ["placement_strategy=SPREAD", "value_loss_coef=0.5"]
    assert openrlhf.unmapped_settings(paper_config().ppo) == []


def test_runtime_env_pins_openrlhfs_stack_or_names_an_image():
    env = openrlhf.runtime_env(paper_config())
    assert env["pip"]["packages"] == ["openrlhf==0.11.2", "vllm==0.29.0", "ray[default]==2.55.0",
                                      "transformers==5.15.0", "deepspeed==0.19.6", "flash-attn==2.8.3"]
    image = openrlhf.runtime_env(paper_config(openrlhf={"image_uri": "registry/openrlhf:0.11.2"}))
    assert image == {"image_uri": "registry/openrlhf:0.11.2"}


def test_runtime_env_merges_with_the_one_openrlhfs_driver_passes_to_ray_init():
    """Ray raises at the driver's ray.init when the job's env_vars share a key with the driver's."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    driver = {"env_vars": {key: "1" for key in openrlhf.OPENRLHF_DRIVER_ENV_VARS}}
    for extra in ({}, {"openrlhf": {"image_uri": "registry/openrlhf:0.11.2"}}):
        assert _merge_runtime_env(openrlhf.runtime_env(paper_config(**extra)), driver) is not None


# -- prompts file, RM check, dry run and submit (tiny:llama models) --------------------------------------


def tiny_run(tmp_path: Path, **ppo) -> Config:
    """A run dir with RMSP dialogues, the tiny policy and a tiny one-output RM."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from almost_ray.models.loading import resolve_model_dir

    run = tmp_path / "runs" / "tiny"
    dialogues = run / "rmsp" / "dialogues.jsonl"
    dialogues.parent.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for q in ["Name a prime.", "word " * 300, "How do I boil an egg?"]]
    dialogues.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm_dir = run / "rm" / "model"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir("tiny:llama"), num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(resolve_model_dir("tiny:llama")).save_pretrained(rm_dir)
    section = {"policy": "tiny:llama", "total_episodes": 5, "rollout_batch_size": 2, "minibatch_size": 1,
               "micro_batch_size": 1, "max_prompt_tokens": 64, **ppo}
    return Config.model_validate({"run_name": "tiny", "runs_dir": str(tmp_path / "runs"), "ppo": section})


def test_prompts_file_holds_rendered_first_turns_cycled_to_the_episodes(tmp_path):
    cfg = tiny_run(tmp_path)
    path = tmp_path / "prompts.jsonl"
    written = openrlhf.write_prompts(cfg, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == (6, 2, 1)  # 3 iterations x 2 episodes; the 300-word prompt is too long
    assert rows == [{"input": "\n\nHuman: Name a prime.\n\nAssistant:"},
                    {"input": "\n\nHuman: How do I boil an egg?\n\nAssistant:"}] * 3
    chat = tiny_run(tmp_path / "chat", prompt_format="chat")
    openrlhf.write_prompts(chat, path)
    assert json.loads(path.read_text().splitlines()[1]) == {"input": "How do I boil an egg?"}


def test_our_rm_directory_has_the_value_head_openrlhf_loads(tmp_path):
    """OpenRLHF's reward model is `<base model> + score = Linear(hidden, 1, bias=False)` read at the last
    attended token: our RM's tensors load into that shape with nothing missing or left over, and give
    the same score as transformers' classifier on an unpadded sequence."""
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification, LlamaModel, LlamaPreTrainedModel

    cfg = tiny_run(tmp_path)
    rm_dir = openrlhf.model_dirs(cfg)[1]
    openrlhf.check_reward_model(rm_dir)

    class BasePlusScore(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = LlamaModel(config)
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

    probe, info = BasePlusScore.from_pretrained(rm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 17, 99, 230, 7]])
    last = probe.score(probe.model(ids).last_hidden_state)[0, -1, 0]
    theirs = AutoModelForSequenceClassification.from_pretrained(rm_dir)(ids).logits[0, 0]
    assert last.item() == pytest.approx(theirs.item(), abs=1e-5)
    policy_dir = Path(openrlhf.model_dirs(cfg)[0])
    with pytest.raises(ConfigError, match="expected a one-output"):
        openrlhf.check_reward_model(policy_dir)  # a causal LM
    headless = tmp_path / "headless"  # an RM config over weights without the head
    headless.mkdir()
    (headless / "config.json").write_text((Path(rm_dir) / "config.json").read_text())
    (headless / "model.safetensors").symlink_to(policy_dir / "model.safetensors")
    with pytest.raises(ConfigError, match="no 'score.weight' tensor"):
        openrlhf.check_reward_model(headless)


def test_dry_run_prints_the_submit_command_and_runtime_env_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = paper_config().model_copy(update={"runs_dir": tmp_path / "runs"})
    cfg.ray.address = "http://head:8265"
    assert openrlhf.launch(cfg, dry_run=True) == 0
    out = capsys.readouterr().out.splitlines()
    submit = shlex.split(out[0])
    dashdash = submit.index("--")
    assert submit[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert submit[5] == "--runtime-env-json" and json.loads(submit[6]) == openrlhf.runtime_env(cfg)
    assert submit[dashdash + 1:] == ["python", "-m", "openrlhf.cli.train_ppo_ray", *openrlhf.build_command(cfg)]
    env_json = "\n".join(line for line in out[1:] if not line.startswith("#"))
    assert json.loads(env_json) == openrlhf.runtime_env(cfg)
    assert not (tmp_path / "runs").exists()


def test_launch_without_a_cluster_address_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="ray.address: no Ray cluster"):
        openrlhf.launch(paper_config(), dry_run=False)


def test_launch_writes_prompts_and_submits_with_the_jobs_sdk(tmp_path, monkeypatch, capsys):
    """The Jobs SDK call is recorded instead of made: the job would pip-install OpenRLHF's CUDA stack."""
    import ray.job_submission

    submitted = {}

    class RecordingClient:
        def __init__(self, address):
            submitted["address"] = address

        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            return "raysubmit_test"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RecordingClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    cfg = tiny_run(tmp_path)
    assert openrlhf.launch(cfg, dry_run=False) == 0
    stage = openrlhf.stage_dir(cfg)
    argv = openrlhf.build_command(cfg)
    assert submitted["address"] == "http://127.0.0.1:8265"
    assert shlex.split(submitted["entrypoint"]) == ["python", "-m", "openrlhf.cli.train_ppo_ray", *argv]
    assert submitted["runtime_env"] == openrlhf.runtime_env(cfg)
    assert len((stage / "prompts.jsonl").read_text().splitlines()) == 6
    assert json.loads((stage / "job.json").read_text())["job_id"] == "raysubmit_test"
    assert "raysubmit_test" in capsys.readouterr().out
