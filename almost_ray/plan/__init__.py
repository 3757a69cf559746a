"""The GPU memory plan: for every stage of a config, where each pool, PPO role, vLLM engine and Ray Train
worker group goes on a cluster of identical GPU nodes and what it holds on each GPU, before any GPU is
rented or any actor starts (`almost-ray plan`, and the preflight of a stage on a real cluster).

`plan.shapes` reads parameter counts from each model's config.json, `plan.memory` turns them into bytes
per GPU (pure functions, with their sources), `plan.stages` lists each stage's phases, pools and bundles
from the config (PPO's through the run's own `rl.roles.plan_bundles`), `plan.layout` places them and
`plan.cluster_plan` puts it together (`make_plan`, `table`); no Ray. `plan.preflight` runs the same plan on
the connected cluster before a stage starts; `plan.dry_run` places it on a (simulated) Ray cluster.
"""
