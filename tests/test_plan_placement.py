"""Placement proven on a simulated GPU cluster: `ray.cluster_utils.Cluster` nodes that declare GPUs (Ray
schedules on declared GPUs and hands out their ids; no CUDA is touched), and the dry placement
(almost_ray/plan/dry_run.py) starting every pool replica, PPO role, vLLM engine (and its workers) and Ray
Train worker of a config by the run's own placement code, each reporting its node, bundle and GPU ids."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from almost_ray.config import load_config
from almost_ray.plan.cluster_plan import make_plan

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "model-shapes"
GIB = 2**30


@pytest.fixture()
def gpu_cluster(request):
    """A head with no CPUs for tasks (as the RayJob's) and `request.param` worker nodes of 8 GPUs, 88 CPUs."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(request.param):
            cluster.add_node(num_cpus=88, num_gpus=8)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def nccl_groups(placed, cfg) -> dict[str, list]:
    """The NCCL groups of a phase: each sharded role's replicas, Ray Train's workers, and the weight sync of
    the policy's rank 0 with every vLLM worker."""
    groups: dict[str, list] = defaultdict(list)
    for p in placed:
        role = p.pool.removeprefix("ppo.")
        if p.pool.endswith("workers") or (p.pool.startswith("ppo.") and role in ("policy", "critic", "reference",
                                                                               "reward") and cfg.ppo.sharded(role)):
            groups[p.pool].append(p)
        if p.pool == "ppo.rollout" or (p.pool == "ppo.policy" and p.rank == 0):
            groups["engine weight sync"].append(p)
    return groups


def check_phase(stage, phase, placed, cfg, layout):
    import ray

    # every replica placed, where it asked to be
    for pool in phase.pools:
        if pool.gpus <= 0 and pool.kind != "ppo":
            continue
        mine = [p for p in placed if p.pool == pool.name]
        expected = pool.replicas * (cfg.ppo.rollout.tensor_parallel_size if pool.name == "ppo.rollout" else 1)
        assert len(mine) == expected, (stage, pool.name, len(mine))
        per_replica = 1 if pool.name == "ppo.rollout" else pool.gpus
        assert all(len(p.gpu_ids) == max(1, int(per_replica)) for p in mine), (stage, pool.name)
    # no GPU holds two ranks of one NCCL group
    for group, members in nccl_groups(placed, cfg).items():
        gpus = [(p.node, g) for p in members for g in p.gpu_ids]
        assert len(gpus) == len(set(gpus)), (stage, group, gpus)
    # the plan's per-GPU sums are the placement's
    estimate = {p.name: p.estimate.total for p in phase.pools}
    on_gpu: dict[tuple, float] = defaultdict(float)
    for p in placed:
        for g in p.gpu_ids:
            on_gpu[(p.node, g)] += estimate[p.pool]
    assert sorted(round(v / GIB, 3) for v in on_gpu.values()) == \
        sorted(round(g.used_bytes / GIB, 3) for g in layout.gpus), stage
    assert len(ray.nodes()) >= 2


@pytest.mark.parametrize("gpu_cluster", [1], indirect=True)
def test_paper_config_places_on_the_rayjob_node(gpu_cluster):
    """Every stage of configs/paper-llama.yaml on the node k8s/rayjob.yaml asks for (8 GPUs): every replica
    lands, no two ranks of one NCCL group share a GPU, each GPU's sum is the plan's, and no placement group
    is left at the end."""
    import ray

    from almost_ray.plan.dry_run import place_stages

    cfg = load_config(ROOT / "configs" / "paper-llama.yaml")
    plan = make_plan(cfg, 1, 8, 80, SHAPES)
    placed = place_stages(cfg, SHAPES)
    assert [(s, len(p.pools)) for s, p, _ in placed] == [(lay.stage, len(lay.phase.pools)) for lay in plan.layouts]
    for (stage, phase, where), layout in zip(placed, plan.layouts):
        check_phase(stage, phase, where, cfg, layout)
    ppo = next(where for stage, _, where in placed if stage == "ppo")
    groups = {p.pool: p.group for p in ppo}
    assert groups["ppo.policy"] == groups["ppo.critic"] != groups["ppo.rollout"]  # engines apart from the roles
    alive = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert alive == []


@pytest.mark.parametrize("gpu_cluster", [2], indirect=True)
def test_tensor_parallel_engines_get_placement_groups_of_their_own(gpu_cluster):
    """PPO with two vLLM engines of tensor parallel 2 on two 8-GPU nodes: each engine has a placement group
    of its own holding its two workers, the engine actor holds no GPU, and the weight-sync group (policy rank
    0 and the four workers) has a GPU per rank."""
    import ray

    from almost_ray.plan.dry_run import place_stages

    cfg = load_config(ROOT / "configs" / "paper-llama.yaml", ["ppo.rollout.tensor_parallel_size=2"])
    plan = make_plan(cfg, 2, 8, 80, SHAPES, only=["ppo"])
    [(stage, phase, placed)] = place_stages(cfg, SHAPES, only=["ppo"])
    check_phase(stage, phase, placed, cfg, plan.layouts[0])
    engines = [p for p in placed if p.pool == "ppo.rollout engine"]
    workers = [p for p in placed if p.pool == "ppo.rollout"]
    assert len(engines) == 2 and all(e.gpu_ids == [] for e in engines)
    by_group = defaultdict(list)
    for w in workers:
        by_group[w.group].append(w)
    roles_group = next(p.group for p in placed if p.pool == "ppo.policy")
    assert len(by_group) == 2 and roles_group not in by_group
    assert {e.group for e in engines} == set(by_group)
    assert all(sorted(w.bundle for w in ws) == [0, 1] for ws in by_group.values())
    alive = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert alive == []
