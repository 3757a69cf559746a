"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with no CPUs and
two 1-CPU nodes, each its own raylet): a generation pool of two replicas and a two-worker train-rm run
on tiny:llama land on both nodes (node ids recorded by the replicas' rows and by each train rank),
and a pool whose replica fits no single node fails the preflight in seconds, naming the pool.
Run in a child process so its cluster is separate from the tests' local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from almost_ray.cluster.config import RayConfig, ResourcesConfig
    from almost_ray.config import Config
    from almost_ray.config_base import ConfigError
    from almost_ray.models.config import ModelConfig, SamplingParams
    from almost_ray.train.config import TrainRMConfig
    from almost_ray.generate.pool import stream_generation
    from almost_ray.train import rm as reward

    work = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        out = {"workers": sorted(n.node_id for n in nodes)}
        rows = [{"id": str(i), "messages": json.dumps([{"role": "user", "content": f"Count to {i}."}])} for i in range(8)]
        model = ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=2)
        res = ResourcesConfig(concurrency=2, num_cpus=1, batch_size=2)
        got = list(stream_generation(rows, model, SamplingParams(max_new_tokens=4), res, "chat"))
        out["generation_rows"] = len(got)
        out["row_nodes_known"] = {r["node_id"] for r in got} <= set(out["workers"])
        # where the pool's replicas were placed (each 1-CPU node fits one): the actor table keeps finished
        # actors with their node; which replica answered which rows depends on start-up order, so rows
        # alone cannot show both nodes
        actors = ray._private.state.actors().values()
        out["generation_nodes"] = sorted({a["Address"]["NodeID"] for a in actors
                                          if a["ActorClassName"].startswith(("MapWorker(", "_MapWorker"))})

        t0 = time.time()
        try:
            list(stream_generation(rows, model, SamplingParams(max_new_tokens=4),
                                   ResourcesConfig(concurrency=1, num_cpus=2), "chat"))
            out["preflight"] = "no error"
        except ConfigError as err:
            out["preflight"] = str(err)
        out["preflight_s"] = time.time() - t0

        pairs = work / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"Tell me {w}.", "chosen": f"{w} is fine.", "rejected": "No."})
                                 + "\\n" for w in ("tea", "rain", "stone", "music")))
        rcfg = TrainRMConfig(model="tiny:llama", num_workers=2, cpus_per_worker=1, global_batch_size=4,
                             micro_batch_size=2, max_steps=1, max_length=32, storage_path=str(work / "ray_storage"),
                             comparisons=str(pairs))
        reward.run(Config(runs_dir=work, run_name="run", train_rm=rcfg))
        ranks = [json.loads(p.read_text()) for p in sorted((work / "run" / "rm" / "workers").glob("rank-*.json"))]
        out["train_nodes"] = sorted(r["node_id"] for r in ranks)
        out["model_saved"] = (work / "run" / "rm" / "model" / "config.json").exists()
        print("RESULT " + json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


@pytest.mark.slow
def test_pools_and_train_workers_run_on_both_nodes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out["generation_rows"] == 8
    assert out["row_nodes_known"]  # every row names the node of the replica that answered it
    assert out["generation_nodes"] == out["workers"]  # one replica on each 1-CPU node
    assert out["train_nodes"] == out["workers"]  # one Ray Train rank on each node
    assert out["model_saved"]
    assert out["preflight"] == "generate.resources pool: needs 2 CPUs per replica, the largest node has 1 CPU"
    assert out["preflight_s"] < 10
