"""bench/gpu_check.py, the command a session lent a GPU runs once: on the CPU with small shapes it runs every
path it runs on the GPU, in a process where Ray, vLLM and the other packages the GPU machine lacks cannot be
imported, so the prepared command cannot rot between two GPU sessions; and the FLOPs its MFU stands on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from almost_ray.models.packing import VARLEN_SDPA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

# installed here, absent on the GPU machine, and not carried there (gpu_check.WHEELS)
NOT_ON_THE_GPU_MACHINE = ("ray", "vllm", "gguf", "rouge_score")


def test_every_path_runs_on_the_cpu_without_ray(tmp_path):
    absent = tmp_path / "absent"
    for name in NOT_ON_THE_GPU_MACHINE:
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(absent), str(ROOT)])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["complete"]
    failed = [(r["path"], r["method"], r.get("error")) for r in result["rows"] if not r["ok"]]
    assert not failed
    rows = {(r["path"], r["method"]): r for r in result["rows"]}
    assert {path for path, _ in rows} == {"train_rm", "train_sft", "ppo", "rm_scoring", "generation", "fsdp2_1proc",
                                          "fsdp2_2proc"}
    assert sum(path == "train_rm" for path, _ in rows) == 3 and sum(path == "train_sft" for path, _ in rows) == 4

    for task in ("train_rm", "train_sft"):
        ours = rows[(task, "almost_ray")]
        assert ours["attention"] == VARLEN_SDPA and ours["master_weights"] == ["torch.float32"]
        assert all(math.isfinite(loss) for loss in ours["loss"]) and ours["tokens_per_s"] > 0
        assert ours["x_trl_defaults"] > 0 and ours["x_trl_fastest"] > 0  # ratios to TRL rows of the same run
    ppo = rows[("ppo", "almost_ray in-process roles")]
    assert set(ppo["devices"].values()) == {"cpu"} and len(ppo["iterations"]) == 1
    assert ppo["episodes_per_s"] > 0 and all(ppo[k] > 0 for k in ("time_rollout_s", "time_scoring_s", "time_training_s"))
    assert math.isfinite(ppo["iterations"][0]["policy_loss"]) and math.isfinite(ppo["iterations"][0]["value_loss"])
    for rules in ("off", "on"):
        assert rows[("generation", f"HFGenerator rules {rules}")]["new_tokens"] > 0
    assert rows[("rm_scoring", "RewardModel")]["tokens_per_s"] > 0
    for world in (1, 2):
        fsdp = rows[(f"fsdp2_{world}proc", f"almost_ray FSDP2 {world} rank(s)")]
        assert fsdp["sharded"] and fsdp["world"] == world and fsdp["backend"] == "gloo"
        assert fsdp["saved_architecture"] == ["LlamaForCausalLM"]
    # one process and two ranks train the same global batches to the same losses
    two, one = (rows[(f"fsdp2_{w}proc", f"almost_ray FSDP2 {w} rank(s)")]["loss"] for w in (2, 1))
    assert two == pytest.approx(one, rel=1e-3)
    assert "episodes/s" in done.stdout and "tokens/s" in done.stdout


def test_model_flops_are_six_per_parameter_and_token_plus_causal_attention():
    """PaLM's accounting on Llama-3.2-1B's shape: 6 FLOPs per matmul parameter per token (the tied LM head as
    one matmul), plus 6 * layers * width * length per token of causal attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads((ROOT / "configs/model-shapes/llama-3.2-1b/config.json").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)  # the embedding is the tied head
    assert gpu_check.model_flops(config, [1], lm_head=True) == 6 * matmul + 6 * 16 * 2048
    two = gpu_check.model_flops(config, [100, 300], lm_head=True)
    assert two == 6 * matmul * 400 + 6 * 16 * 2048 * (100**2 + 300**2)
    # a reward model's head is one output wide
    head = config.vocab_size * config.hidden_size
    assert gpu_check.model_flops(config, [1], lm_head=False) == 6 * (matmul - head + config.hidden_size) + 6 * 16 * 2048


def test_the_documented_device_command_is_the_scripts():
    """docs/performance.md quotes the command a session lent a GPU runs; it must be the one --prepare prints."""
    assert gpu_check.DEVICE_COMMAND in (ROOT / "docs" / "performance.md").read_text()
