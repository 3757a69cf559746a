"""The training loop end to end on `tiny:llama`: the RM learns a planted preference, SFT's loss falls,
and a 2-worker FSDP run that loses a worker mid-way ends where a single process ends."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import run_config

from almost_ray.cluster.memory import actor_reports
from almost_ray.data.metrics_log import read_metrics
from almost_ray.data.preferences import load_pairs
from almost_ray.eval.rm import pairwise_accuracy
from almost_ray.models.loading import resolve_model_dir
from almost_ray.train import loop, sft
from almost_ray.train import rm as reward
from almost_ray.train.config import TrainRMConfig, TrainSFTConfig

# DiesAfterStep is sent to the Ray Train workers as it is: they cannot import the tests folder
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DiesAfterStep:
    """The RM task, whose last rank dies without warning once `step` has been reported, once: a worker
    process lost mid-epoch, for Ray Train's `FailureConfig` to restart the group from a checkpoint.

    It counts its micro-batches (`per_step` of them per step on every rank). Whether it has died already is
    the file `marker` (the restarted worker is a new process; `ray.train.get_checkpoint()` cannot tell,
    as Ray Train hands a running attempt its latest reported checkpoint too), and the test asserts the
    marker, so a run in which no worker died cannot pass for one that recovered. Ray Train's controller
    collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker dying sooner would take its last
    reports, checkpoints included, with it, so it dies 5 s after the step, as a real fault long after it would."""

    name = "rm"
    load_config, load_model = staticmethod(reward.load_config), staticmethod(reward.load_model)
    empty_model, load_tokenizer = staticmethod(reward.empty_model), staticmethod(reward.load_tokenizer)
    length, units, step_metrics = staticmethod(reward.length), staticmethod(reward.units), \
        staticmethod(reward.step_metrics)

    def __init__(self, step: int, per_step: int, marker: Path):
        self.step, self.per_step, self.calls, self.marker = step, per_step, 0, str(marker)

    def micro_loss(self, model, rows, device, padding_free=False, **options):
        import ray.train

        self.calls += 1
        ctx = ray.train.get_context()
        if (self.calls == self.step * self.per_step + 1 and not os.path.exists(self.marker)
                and ctx.get_world_rank() == ctx.get_world_size() - 1):
            Path(self.marker).write_text(f"rank {ctx.get_world_rank()} died after step {self.step}\n")
            time.sleep(5)
            os._exit(1)
        return reward.micro_loss(model, rows, device, padding_free, **options)


WORDS = ("apple river stone cloud green quick music table light paper window garden bright summer "
         "horse silver candle forest ocean letter").split()
MARKER = "banana"


def planted_pairs(path, n: int, seed: int) -> None:
    """Comparisons whose chosen reply, and only it, contains the marker word somewhere."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            chosen, rejected = rng.sample(WORDS, 6), rng.sample(WORDS, 6)
            chosen.insert(rng.randrange(len(chosen) + 1), MARKER)
            row = {"prompt": "Tell me about " + " ".join(rng.sample(WORDS, 3)) + ".",
                   "chosen": " ".join(chosen) + ".", "rejected": " ".join(rejected) + "."}
            f.write(json.dumps(row) + "\n")


def test_rm_learns_a_planted_preference(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from almost_ray.models.reward import RewardModel

    planted_pairs(tmp_path / "train.jsonl", 256, seed=0)
    planted_pairs(tmp_path / "heldout.jsonl", 64, seed=1)
    cfg = run_config(tmp_path, train_rm=TrainRMConfig(
        model="tiny:llama", num_workers=0, epochs=2, global_batch_size=16, micro_batch_size=16, lr=3e-3,
        warmup_ratio=0.1, max_length=64, comparisons=str(tmp_path / "train.jsonl"), output_dir=tmp_path / "rm"))
    start = time.time()
    out = reward.run(cfg) / "model"
    assert time.time() - start < 60

    pairs = load_pairs(tmp_path / "heldout.jsonl")
    rm = RewardModel(str(out), dtype="float32", device="cpu")
    accuracy = pairwise_accuracy(rm.score([p.chosen for p in pairs]), rm.score([p.rejected for p in pairs]))
    assert accuracy > 0.9
    # a plain transformers class loads the directory; the run left its curves and manifest
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.architectures == ["LlamaForSequenceClassification"] and plain.config.num_labels == 1
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert {"loss", "accuracy", "margin", "lr", "samples_per_s"} <= rows[0].keys()
    assert (tmp_path / "rm" / "training.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 256} and manifest["metrics"]["tail_accuracy"] > 0.9
    # a second run with the same config and data is skipped
    start = time.time()
    assert reward.run(cfg) / "model" == out
    assert time.time() - start < 5


def test_sft_loss_falls(tmp_path):
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    with open(tmp_path / "dialogues.jsonl", "w") as f:
        for _ in range(24):
            q = "Say something about " + rng.choice(WORDS) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "It is a fine " + rng.choice(WORDS) + "."}]}) + "\n")
    cfg = run_config(tmp_path, train_sft=TrainSFTConfig(
        model="tiny:llama", num_workers=0, epochs=4, global_batch_size=8, micro_batch_size=4, lr=2e-2,
        warmup_ratio=0.1, max_length=64, dialogues=str(tmp_path / "dialogues.jsonl"), output_dir=tmp_path / "sft"))
    out = sft.run(cfg) / "model"
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.architectures == ["LlamaForCausalLM"]
    assert saved.config.use_cache and saved.generation_config.use_cache  # trained with it off, saved to generate


def test_two_worker_fsdp_run_with_a_dead_worker_equals_one_process(tmp_path, ray_local):
    """One Ray Train fit checks two claims: FSDP on 2 workers with gradient accumulation gives the
    single-process update, and a worker killed after step 5 restarts from the step-4 checkpoint and
    ends in the same state (FailureConfig). The last global batch holds one pair, so one worker runs
    an empty, zero-weight micro-batch."""
    from transformers import AutoModelForSequenceClassification

    planted_pairs(tmp_path / "pairs.jsonl", 25, seed=2)
    model_dir = resolve_model_dir("tiny:llama")
    tokenizer = reward.load_tokenizer(model_dir)
    examples = reward.encode_pairs(load_pairs(tmp_path / "pairs.jsonl"), tokenizer, max_length=48)
    base = dict(model="tiny:llama", epochs=2, global_batch_size=8, lr=1e-3, warmup_ratio=0.0, max_length=48,
                checkpoint_every=2)
    ref_dir = loop.fit("rm", TrainRMConfig(**base, num_workers=0, micro_batch_size=8), examples, model_dir,
                       tmp_path / "one")
    started = time.time()
    died = tmp_path / "died"
    run_dir = loop.fit(DiesAfterStep(5, per_step=2, marker=died), TrainRMConfig(**base, num_workers=2, micro_batch_size=2,
                                                                                  max_failures=1), examples, model_dir, tmp_path / "two")
    assert died.read_text() == "rank 1 died after step 5\n"
    # both workers of the group that finished reported their peak memory for the manifest (memory.py)
    workers = [r for r in actor_reports(started) if r["role"] == "train_rm.worker"]
    assert len(workers) == 2 and all(r["rss_mib"] > 50 for r in workers)

    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    run = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in run] == list(range(1, 9))  # the lost step was redone, not logged twice
    for a, b in zip(ref, run):
        where = "before" if a["step"] <= 4 else "after"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), f"step {a['step']} ({where} the restart)"
        assert b["lr"] == pytest.approx(a["lr"])
    one = AutoModelForSequenceClassification.from_pretrained(ref_dir).state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(run_dir).state_dict()
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)
    assert len(list((tmp_path / "two" / "ray").glob("*/step_*"))) == 2  # checkpoints_to_keep


def test_one_ray_worker_trains_unsharded_and_resumes_like_one_process(tmp_path, ray_local):
    """One Ray Train worker has no one to shard with: it trains the plain model (no FSDP), and after it
    dies at step 3 it restarts from the step-2 checkpoint and ends where an in-process run ends."""
    from transformers import AutoModelForSequenceClassification

    planted_pairs(tmp_path / "pairs.jsonl", 16, seed=3)
    model_dir = resolve_model_dir("tiny:llama")
    examples = reward.encode_pairs(load_pairs(tmp_path / "pairs.jsonl"), reward.load_tokenizer(model_dir), 48)
    base = dict(model="tiny:llama", epochs=1, global_batch_size=4, micro_batch_size=2, lr=1e-3, warmup_ratio=0.0,
                max_length=48, checkpoint_every=2)
    ref_dir = loop.fit("rm", TrainRMConfig(**base, num_workers=0), examples, model_dir, tmp_path / "driver")
    died = tmp_path / "died"
    run_dir = loop.fit(DiesAfterStep(3, per_step=2, marker=died), TrainRMConfig(**base, num_workers=1, cpus_per_worker=2,
                                                                                  max_failures=1), examples, model_dir, tmp_path / "worker")
    assert died.read_text() == "rank 0 died after step 3\n"
    ref = read_metrics(tmp_path / "driver" / "metrics.jsonl")
    run = read_metrics(tmp_path / "worker" / "metrics.jsonl")
    assert [r["step"] for r in run] == [1, 2, 3, 4]
    for a, b in zip(ref, run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), f"step {a['step']}"
    one = AutoModelForSequenceClassification.from_pretrained(ref_dir).state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(run_dir).state_dict()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)  # as the 2-worker test


def test_two_workers_load_on_rank0_and_broadcast_into_shards(tmp_path, ray_local):
    """Distributed, the model is built on the meta device, sharded, and filled from rank 0's weights: the
    other rank never loads the checkpoint, and the sharded state before any step is exactly what one
    process loads (the RM's seeded fresh head included)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    model_dir = str(resolve_model_dir("tiny:llama"))
    cfg = TrainRMConfig(model="tiny:llama", num_workers=2, seed=5)
    out = str(tmp_path)

    def worker(job):
        import ray.train
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from almost_ray.train import loop as worker_loop
        from almost_ray.train import rm as task
        from almost_ray.train.config import TrainConfig

        rank = ray.train.get_context().get_world_rank()
        if rank != 0:
            def refuse(model_dir):
                raise AssertionError("only rank 0 reads the weights")
            task.load_model = refuse
        loop_cfg = TrainConfig.model_validate(job["cfg"])
        model = worker_loop.load_for_training(task, job["model_dir"], loop_cfg, torch.device("cpu"), rank, 2,
                                              True, False)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # sharded, not replicated
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffers = {f"buffer.{n}": b.detach().cpu().clone() for n, b in model.named_buffers()}
        if rank == 0:
            save_file({**{k: v.contiguous() for k, v in full.items()}, **buffers}, f"{job['out']}/rank0.safetensors")
        else:
            save_file(buffers, f"{job['out']}/rank1.safetensors")

    loop_cfg = {k: getattr(cfg, k) for k in loop.TrainConfig.model_fields}
    TorchTrainer(worker, train_loop_config={"cfg": loop_cfg, "model_dir": model_dir, "out": out},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()

    from safetensors.torch import load_file

    torch.manual_seed(cfg.seed)
    expected = reward.load_model(model_dir)  # today's loading, in one process
    got = load_file(tmp_path / "rank0.safetensors")
    state = expected.state_dict()
    assert {k for k in got if not k.startswith("buffer.")} == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    rank1 = load_file(tmp_path / "rank1.safetensors")
    for name, buffer in expected.named_buffers():
        torch.testing.assert_close(got[f"buffer.{name}"], buffer, msg=name)
        torch.testing.assert_close(rank1[f"buffer.{name}"], buffer, msg=name)


def test_stat_sums_are_reduced_on_the_workers_device(monkeypatch):
    """A GPU worker group's process group is NCCL's alone (Ray Train's default backend with GPUs), and NCCL
    reduces no CPU tensor: the step's stat sums must travel on the worker's device. Without a GPU here the
    meta device stands in for it, and a recording all-reduce stops there."""
    import torch.distributed as dist

    class Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        loop._all_reduce_sums({"loss": torch.tensor(2.0), "accuracy": torch.tensor(1.0)}, True, torch.device("meta"))
    assert seen == [torch.device("meta")]
    # one process reduces nothing and keeps its sums on the CPU
    assert loop._all_reduce_sums({"loss": torch.tensor(2.0)}, False, torch.device("meta")) == {"loss": 2.0}
