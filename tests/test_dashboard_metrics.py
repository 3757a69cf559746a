"""Dashboard metrics reach Prometheus: a Ray started with a metrics export port runs two small stages
on tiny:llama — query mining (driver-side counters, actor-side tokens) and train-rm (gauges from a Ray
Train worker) — and the node's `/metrics` endpoint shows `ray_almost_ray_*` series tagged with the
run and the stage. Run in a child process, so its Ray (with the export port) is its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import json, socket, sys, threading, time, urllib.request
    from pathlib import Path
    import ray
    from almost_ray.config import Config
    from almost_ray.synth import queries
    from almost_ray.train import rm as reward

    work = Path(sys.argv[1])
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    wanted = ["ray_almost_ray_queries_mined_total", "ray_almost_ray_queries_parsed_total",
              "ray_almost_ray_queries_tokens_generated_total", "ray_almost_ray_queries_progress",
              "ray_almost_ray_train_rm_loss", "ray_almost_ray_train_rm_accuracy", "ray_almost_ray_train_rm_progress"]
    found = {}
    running = True

    def scrape():  # during the run, as Prometheus would: Ray drops a gauge ~30 s after its last update
        while running or len(found) < len(wanted):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            except OSError:  # the metrics agent is still starting
                body = ""
            for line in body.splitlines():
                name = line.split("{")[0]
                if name in wanted and 'run="metricsrun"' in line:
                    found[name] = line
            if not running and time.time() > deadline:
                break
            time.sleep(2)

    deadline = float("inf")
    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        seeds = work / "seeds.txt"
        seeds.write_text("How do I clean a pan?\\nWhat is the tallest tree?\\nWhy is the sea salty?\\n")
        pairs = work / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"Tell me {w}.", "chosen": f"{w} is fine.", "rejected": "No."})
                                 + "\\n" for w in ("tea", "rain", "stone", "music")))
        cfg = Config.model_validate(dict(
            runs_dir=str(work), run_name="metricsrun",
            queries=dict(seeds=str(seeds), target=50, prompts_per_round=2, max_rounds=1, static_shots=2,
                         dynamic_shots=0, min_chars=1, end_chars="", banned_words=[],
                         model={"ref": "tiny:llama", "dtype": "float32"}, sampling={"max_new_tokens": 12},
                         resources={"concurrency": 1, "num_cpus": 1, "batch_size": 2}),
            train_rm=dict(model="tiny:llama", num_workers=1, cpus_per_worker=1, global_batch_size=4,
                          micro_batch_size=4, max_steps=2, max_length=32, comparisons=str(pairs))))
        queries.run(cfg)
        reward.run(cfg)
        deadline = time.time() + 60  # the last values are exported within a few seconds
        running = False
        scraper.join()
        print("FOUND " + json.dumps(found))
    finally:
        ray.shutdown()
''')


@pytest.mark.slow
def test_stage_metrics_reach_the_prometheus_endpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("FOUND ", 1)[1].splitlines()[0])
    assert set(found) == {"ray_almost_ray_queries_mined_total", "ray_almost_ray_queries_parsed_total",
                          "ray_almost_ray_queries_tokens_generated_total", "ray_almost_ray_queries_progress",
                          "ray_almost_ray_train_rm_loss", "ray_almost_ray_train_rm_accuracy",
                          "ray_almost_ray_train_rm_progress"}, found
    assert 'stage="queries"' in found["ray_almost_ray_queries_mined_total"]
    assert 'stage="train_rm"' in found["ray_almost_ray_train_rm_loss"]
    assert float(found["ray_almost_ray_queries_tokens_generated_total"].rsplit(" ", 1)[1]) > 0
