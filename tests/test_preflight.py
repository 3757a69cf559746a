"""Resource preflight: the packing arithmetic (pure), and a GPU pool on this CPU machine failing fast
through the real CLI with a one-line error naming the pool."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.preflight import pool_bundles, preflight, shortfall, train_bundles
from almost_ray.config_base import ConfigError
from almost_ray.train.config import TrainConfig

TWO_NODES = [{"CPU": 2.0, "memory": 8 * 2**30}, {"CPU": 2.0, "memory": 8 * 2**30}]


def test_a_gpu_replica_on_a_cpu_cluster_names_the_pool_and_the_shortfall():
    bundles = pool_bundles(ResourcesConfig(num_gpus=2, concurrency=1))
    assert shortfall("rmsp.assistant", bundles, TWO_NODES) == (
        "rmsp.assistant pool: needs 2 GPUs per replica, the cluster has 0 GPUs")


def test_a_replica_must_fit_one_node_even_when_the_cluster_has_enough_in_total():
    bundles = pool_bundles(ResourcesConfig(num_cpus=3, concurrency=1))
    assert shortfall("generate.resources", bundles, TWO_NODES) == (
        "generate.resources pool: needs 3 CPUs per replica, the largest node has 2 CPUs")


def test_a_pool_larger_than_the_cluster_says_how_many_replicas_fit():
    bundles = pool_bundles(ResourcesConfig(num_cpus=1.5, concurrency=3))
    assert shortfall("eval.resources", bundles, TWO_NODES) == (
        "eval.resources pool: needs 4.5 CPUs for 3 replicas, the cluster has 4 CPUs (room for 2 replicas at once)")
    # 2 CPUs each on two 2-CPU nodes: 4 of 4 CPUs, fits exactly
    assert shortfall("x", pool_bundles(ResourcesConfig(num_cpus=2, concurrency=2)), TWO_NODES) is None


def test_memory_and_cpu_must_fit_the_same_node():
    nodes = [{"CPU": 4.0, "memory": 1 * 2**30}, {"CPU": 1.0, "memory": 16 * 2**30}]
    bundles = pool_bundles(ResourcesConfig(num_cpus=2, memory_gb=4))
    assert shortfall("p", bundles, nodes) == (
        "p pool: needs 2 CPUs + 4 GiB of memory per replica on one node, no node has all of them")


def test_train_workers_are_bundles_too():
    cfg = TrainConfig(num_workers=2, cpus_per_worker=1, use_gpu=True, gpus_per_worker=1)
    assert train_bundles(cfg) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert "needs 1 GPU per replica, the cluster has 0 GPUs" in shortfall("train_rm workers", train_bundles(cfg), TWO_NODES)


def test_preflight_against_the_running_cluster(ray_local):
    preflight("fits", pool_bundles(ResourcesConfig(num_cpus=1, concurrency=2)))
    with pytest.raises(ConfigError, match="^big pool: needs 3 CPUs per replica, the cluster has 2 CPUs$"):
        preflight("big", pool_bundles(ResourcesConfig(num_cpus=3)))


def test_cli_stops_a_gpu_pool_within_seconds_with_one_line(tmp_path):
    (tmp_path / "q.txt").write_text("What is rain?\n")
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "almost_ray.cli", "generate", "--input", str(tmp_path / "q.txt"),
         "--output", str(tmp_path / "out.jsonl"), "--set", "generate.model.ref=tiny:llama",
         "--set", "generate.resources.num_gpus=1", "--set", "ray.num_cpus=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "generate.resources pool: needs 1 GPU per replica, the cluster has 0 GPUs" in proc.stderr.splitlines()
    assert time.time() - started < 60  # Ray start-up and the check, no model load, no waiting on actors
    assert not (tmp_path / "out.jsonl").exists()


def test_rmsp_stops_before_loading_any_role_when_one_role_cannot_fit(ray_local, tmp_path, tiny_rm):
    from almost_ray.config import load_config
    from almost_ray.rmsp import stage

    (tmp_path / "q.txt").write_text("What is rain?\n")
    cfg = load_config(None, [f"runs_dir={tmp_path}", f"rmsp.queries={tmp_path / 'q.txt'}",
                             "rmsp.assistant.model.ref=tiny:llama", "rmsp.user.model.ref=tiny:llama",
                             f"rmsp.reward_model.ref={tiny_rm}", "rmsp.assistant.resources.num_cpus=0.1",
                             "rmsp.user.resources.num_cpus=0.1", "rmsp.reward_model.resources.num_gpus=2"])
    started = time.time()
    with pytest.raises(ConfigError, match=r"^rmsp\.reward_model\.resources pool: needs 2 GPUs per replica, "
                                          r"the cluster has 0 GPUs$"):
        stage.run(cfg)
    assert time.time() - started < 30
