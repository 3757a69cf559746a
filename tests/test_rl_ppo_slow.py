"""PPO end to end on tiny models (slow: each run starts five Ray actors).

- a planted reward rises within a few iterations while the KL stays bounded, and a larger lambda
  gives a smaller KL; the same with each critic-free estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++), and
  Ray's state API shows that no critic actor was started;
- the stage through the CLI writes model/, metrics.jsonl, ppo.png and the manifest, and the model
  reloads with plain transformers; a killed run, started again, ends where the uninterrupted one ends;
- on a real 3-node Ray cluster (one raylet per node) SPREAD puts role groups on different nodes, and
  no placement group of ours is left afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_ppo

from almost_ray.models.loading import load_tokenizer, resolve_model_dir
from almost_ray.rl.config import PPOConfig

pytestmark = pytest.mark.slow

MARKERS = [2644, 2767, 2388, 3187]  # " cat", " dog", " sun", " tree" in the embedded model's tokenizer
ONE_CPU = dict(
    colocate=[["policy", "critic", "reference", "reward"]], torch_threads=1, dtype="float32",
    policy_resources={"num_cpus": 0.25}, critic_resources={"num_cpus": 0.25},
    reference_resources={"num_cpus": 0.25}, reward_resources={"num_cpus": 0.25}, rollout={"num_cpus": 0.5},
)


def start_local_ray():
    """A 2-CPU Ray of this process (`address="local"`: never another process's cluster on this machine), with
    its dashboard, which serves the state API (`ray.util.state` answers an empty list without it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        start_local_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"Tell me about topic {i}.\n" for i in range(32)))
    return path


@pytest.fixture(scope="module")
def planted_policy(tmp_path_factory):
    """tiny:llama made to favour four words: every token embedding carries a constant direction that the
    (untied) output head maps onto the four marker tokens, so the policy samples mostly ' cat', ' dog',
    ' sun' and ' tree' (a random 49k-token policy would almost never sample any one marker, and PPO
    cannot reinforce what it never samples)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    source = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"))
    config = source.config
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 3.0
        model.lm_head.weight.zero_()
        for token in MARKERS:
            model.lm_head.weight[token, 0] = 2.0
            model.lm_head.weight[token, 1:] = torch.randn(config.hidden_size - 1, generator=gen) * 0.5
    out = tmp_path_factory.mktemp("planted") / "policy"
    model.save_pretrained(out)
    load_tokenizer("tiny:llama").save_pretrained(out)
    return out


def cat_reward(max_new_tokens: int):
    """The planted RM: the share of response tokens that are ' cat' (a local class: pickled by value)."""

    class CatCount:
        def score(self, conversations):
            return [c[-1]["content"].count("cat") / max_new_tokens for c in conversations]

    return CatCount


def _metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_planted_reward_rises_and_kl_coef_bounds_the_kl(local_ray, tmp_path, tiny_rm, prompts, planted_policy):
    runs = {}
    for kl_coef in (0.05, 1.0):
        cfg = PPOConfig(
            policy=str(planted_policy), reward_model=str(tiny_rm), critic_init="policy", total_episodes=16 * 6,
            rollout_batch_size=16, minibatch_size=8, micro_batch_size=8, ppo_epochs=2, max_new_tokens=8,
            lr=3e-3, min_lr=3e-3, critic_lr=3e-3, kl_coef=kl_coef, checkpoint_every=10, **ONE_CPU,
        )
        out = run_ppo(cfg, tmp_path / f"kl{kl_coef}", prompts, scorer=cat_reward(8))
        runs[kl_coef] = _metrics(out)
    low = runs[0.05]
    first, last = low[0]["reward_mean"], sum(r["reward_mean"] for r in low[-2:]) / 2
    assert last > first + 0.15, [r["reward_mean"] for r in low]
    assert all(abs(r["kl"]) < 20 for r in low), [r["kl"] for r in low]
    assert runs[1.0][-1]["kl"] < low[-1]["kl"], ([r["kl"] for r in runs[1.0]], [r["kl"] for r in low])


def actors_of(class_name: str) -> list:
    """Every actor of this class the Ray of this process has started (alive or dead), from the GCS's actor
    table: `ray.util.state` would need the dashboard, which the tests' Ray does not start."""
    from ray._private.state import actors

    return [a for a in actors().values() if a["ActorClassName"] == class_name]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_planted_reward_rises_without_a_critic(local_ray, tmp_path, tiny_rm, prompts, planted_policy, estimator):
    """Groups of 4 responses per prompt (reinforce_pp too: its batch baseline does not need them); GRPO with
    its KL as a k3 loss term, the others with the KL penalty in the reward. The run's policy actor is in
    Ray's record, so the check that no critic actor is there cannot pass because the API saw nothing."""
    kl = {"use_kl_loss": True, "kl_estimator": "k3"} if estimator == "grpo" else {}
    cfg = PPOConfig(
        policy=str(planted_policy), reward_model=str(tiny_rm), advantage_estimator=estimator, n_samples_per_prompt=4,
        total_episodes=16 * 6, rollout_batch_size=16, minibatch_size=8, micro_batch_size=8, ppo_epochs=2,
        max_new_tokens=8, lr=3e-3, min_lr=3e-3, kl_coef=0.05, checkpoint_every=10, **kl, **ONE_CPU,
    )
    policies_before, critics_before = len(actors_of("PolicyActor")), len(actors_of("CriticActor"))
    out = run_ppo(cfg, tmp_path / estimator, prompts, scorer=cat_reward(8))
    rows = _metrics(out)
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert last > first + 0.15, [r["reward_mean"] for r in rows]
    assert all(abs(r["kl"]) < 20 for r in rows), [r["kl"] for r in rows]
    assert all("value_loss" not in r for r in rows) and ("kl_loss" in rows[-1]) == (estimator == "grpo")
    assert json.loads((out / "placement.json").read_text()).keys() == {"policy", "reference", "reward", "rollout"}
    assert not list((out / "checkpoints").glob("*/critic"))
    assert len(actors_of("PolicyActor")) == policies_before + 1
    assert len(actors_of("CriticActor")) == critics_before  # none started by this run


def test_demo_config_grpo_path_runs_five_iterations_without_a_critic(local_ray, tmp_path, tiny_rm, prompts, capsys):
    """`almost-ray ppo -c configs/demo.yaml --set ppo.advantage_estimator=grpo` as the demo runs it (its sizes,
    bundles, threads and engine), on tiny models instead of the demo's SFT policy and RM."""
    from almost_ray import cli

    repo = Path(__file__).resolve().parents[1]
    critics_before = len(actors_of("CriticActor"))
    assert cli.main(["ppo", "-c", str(repo / "configs" / "demo.yaml"), "--prompts", str(prompts),
                     "--set", "ppo.advantage_estimator=grpo", "--set", f"runs_dir={tmp_path}",
                     "--set", "ppo.policy=tiny:llama", "--set", f"ppo.reward_model={tiny_rm}"]) == 0
    out = tmp_path / "demo" / "ppo"
    rows = _metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and all(r["episodes"] == 16 for r in rows)
    assert all(isinstance(r["reward_mean"], float) and "value_loss" not in r for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["iterations"] == 5 and "final_reward_mean" in manifest["metrics"]
    assert set(manifest["memory"]["actors_peak_mib"]["by_role"]) == {"ppo.policy", "ppo.reference", "ppo.reward",
                                                                     "ppo.rollout"}
    assert json.loads((out / "placement.json").read_text()).keys() == {"policy", "reference", "reward", "rollout"}
    assert len(actors_of("CriticActor")) == critics_before
    printed = capsys.readouterr().out
    assert "5 iterations of 16 episodes (4 per prompt), advantages: grpo" in printed
    assert "[ppo] iteration 5/5 reward" in printed


def driver_killed_after(iteration: int):
    """The PPO driver dying once `iteration` is logged and checkpointed as due: `after_iteration` raising there."""
    def after_iteration(n: int) -> None:
        if n == iteration:
            raise RuntimeError(f"fault injected after iteration {n}")
    return after_iteration


def _small(tiny_rm, **over):
    base = dict(policy="tiny:llama", reward_model=str(tiny_rm), total_episodes=16, rollout_batch_size=4,
                minibatch_size=2, micro_batch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-3, min_lr=1e-4,
                critic_lr=1e-3, checkpoint_every=2, **ONE_CPU)
    return {**base, **over}


def test_stage_cli_outputs_and_resume_after_a_kill(local_ray, tmp_path, tiny_rm, prompts):
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from almost_ray import cli

    # uninterrupted, through the CLI
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"run_name": "whole", "runs_dir": str(tmp_path),
                                      "ppo": json.loads(PPOConfig(**_small(tiny_rm)).model_dump_json())}))
    assert cli.main(["ppo", "--config", str(config), "--prompts", str(prompts)]) == 0
    whole = tmp_path / "whole" / "ppo"
    for name in ("metrics.jsonl", "ppo.png", "manifest.json", "placement.json", "model/model.safetensors"):
        assert (whole / name).is_file(), name
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["counts"]["iterations"] == 4 and manifest["metrics"]["iterations"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(whole / "model")
    assert reloaded.config.architectures == ["LlamaForCausalLM"]
    assert len(_metrics(whole)) == 4

    # killed after iteration 3 (checkpoint at 2), then started again
    cfg = PPOConfig(**_small(tiny_rm))
    with pytest.raises(RuntimeError, match="fault injected"):
        run_ppo(cfg, tmp_path / "killed", prompts, after_iteration=driver_killed_after(3))
    assert not (tmp_path / "killed" / "ppo" / "manifest.json").exists()
    resumed = run_ppo(cfg, tmp_path / "killed", prompts)
    rows_a, rows_b = _metrics(whole), _metrics(resumed)
    assert [r["iteration"] for r in rows_b] == [1, 2, 3, 4]
    for a, b in zip(rows_a, rows_b):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["iteration"], key)
    wa, wb = load_file(whole / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    assert len(list((resumed / "checkpoints").glob("iter_*"))) == 2

    # done: a second run is skipped
    assert run_ppo(cfg, tmp_path / "killed", prompts) == resumed


def test_two_policy_replicas_take_the_step_of_one(local_ray):
    """FSDP2 over 2 replicas (gloo) on halves of a minibatch: the replicas hold half the weights each, and
    end with the weights of 1 replica trained on all of it (gathered layer by layer for the engines)."""
    import ray

    from almost_ray.rl.roles import PolicyActor
    from almost_ray.rl.trainer import on_replicas, train_on_replicas
    from almost_ray.rl.weights import as_tensors

    cfg = PPOConfig(**_small(None, lr=1e-3, policy_resources={"replicas": 2})).model_dump(mode="json")
    Actor = ray.remote(num_cpus=0.5)(PolicyActor)
    pair = [Actor.remote(cfg, "tiny:llama", rank=r, world=2) for r in range(2)]
    single = Actor.remote(PPOConfig(**_small(None, lr=1e-3)).model_dump(mode="json"), "tiny:llama")
    try:
        host, port = ray.get(pair[0].address.remote())
        ray.get([a.join_group.remote(host, port) for a in pair])
        whole, *halves = ray.get([a.local_bytes.remote() for a in (single, *pair)])
        assert all(0.45 * whole < h < 0.55 * whole for h in halves)  # fp32 weights and AdamW state, sharded
        tokenizer = load_tokenizer("tiny:llama")
        prompts = [tokenizer(f"\n\nHuman: question {i}\n\nAssistant:", add_special_tokens=False).input_ids
                   for i in range(5)]
        gen = torch.Generator().manual_seed(0)
        responses = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 2, 6, 3, 4)]
        batch = {"prompt_ids": prompts, "response_ids": responses}
        old = ray.get(single.logprobs.remote(batch, 6))
        assert torch.allclose(on_replicas(pair, "logprobs", batch, 6, 2), old, atol=1e-5)
        minibatch = {**batch, "old_logprobs": old, "advantages": torch.randn(5, 6, generator=gen)}
        for _ in range(2):  # two steps: Adam's state must agree too; 3 and 2 episodes, 2 micro-batches each
            one = ray.get(train_on_replicas([single], minibatch, 6, 2))
            two = ray.get(train_on_replicas(pair, minibatch, 6, 2))
            assert sum(s["loss"] for s in two) == pytest.approx(one[0]["loss"], rel=1e-4)
        w1, w2, nothing = ray.get([a.weights.remote() for a in (single, *pair)])
        w1, w2 = as_tensors(w1), as_tensors(w2)
        assert nothing is None and set(w1) == set(w2)
        for name in w1:
            assert torch.allclose(w1[name], w2[name], atol=1e-5), name
        # the engines' sync: rank 0 broadcasts each gathered tensor to an engine (gloo standing in for NCCL)
        import sys

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the classes below live in this file
        host, port = ray.get(pair[0].address.remote())
        engine = ray.remote(num_cpus=0)(RecordingEngine).remote(host, port, 2)
        ray.get(pair[0].__ray_call__.remote(_open_gloo_sync, host, port, 2))
        ray.get([a.broadcast_weights.remote([engine]) for a in pair])
        received = ray.get(engine.received.remote())
        assert set(received) == set(w1)
        for name, tensor in received.items():
            assert torch.allclose(tensor, w1[name], atol=1e-5), name
        changed = ray.get(single.logprobs.remote(batch, 6))
        assert not torch.allclose(changed, old, atol=1e-4)
    finally:
        for actor in [*pair, single]:
            ray.kill(actor)


def test_every_role_sharded_runs_as_unsharded_and_resumes(local_ray, tmp_path, tiny_rm, prompts):
    """Two replicas of every role, all sharded with FSDP2 (gloo; the reference and the reward through
    `shard_frozen`): the same rewards, KL and losses as one replica of each, and a run killed after its
    first iteration resumes from its sharded checkpoint to the same final policy, saved as a plain HF model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = {**_small(tiny_rm), "total_episodes": 8, "ppo_epochs": 1, "checkpoint_every": 1}
    cfg = PPOConfig(**base)
    one = run_ppo(cfg, tmp_path / "one", prompts)
    two = {"replicas": 2, "num_cpus": 0.2}
    sharded = PPOConfig(**{**base, **{f"{r}_resources": two for r in ("policy", "critic", "reference", "reward")},
                           "rollout": {"num_cpus": 0.4}, "shard_frozen": ["reference", "reward"]})
    assert all(sharded.sharded(r) for r in ("policy", "critic", "reference", "reward"))
    with pytest.raises(RuntimeError, match="fault injected"):
        run_ppo(sharded, tmp_path / "two", prompts, after_iteration=driver_killed_after(1))
    resumed = run_ppo(sharded, tmp_path / "two", prompts)
    for a, b in zip(_metrics(one), _metrics(resumed), strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["iteration"], key)
    assert AutoModelForCausalLM.from_pretrained(resumed / "model").config.architectures == ["LlamaForCausalLM"]
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


class GlooBroadcast:
    """vLLM's `PyNcclCommunicator.broadcast` over a gloo group of its own (a TCPStore and ProcessGroupGloo,
    outside torch.distributed's default group, as vLLM's StatelessProcessGroup is): NCCL without a GPU."""

    def __init__(self, host: str, port: int, rank: int, world: int):
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(host, port, world, rank == 0, timeout=timedelta(seconds=60))
        self.group = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60))

    def broadcast(self, tensor, src: int, stream=None) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()


def _open_gloo_sync(actor, host: str, port: int, world: int) -> None:
    actor._engine_sync = GlooBroadcast(host, port, 0, world)


class RecordingEngine:
    """The engine side of the weight sync (rl/vllm_sync.WeightSync.update_weight) keeping what it receives."""

    def __init__(self, host: str, port: int, world: int):
        self.sync = GlooBroadcast(host, port, 1, world)
        self.got: dict[str, torch.Tensor] = {}

    def update_weight(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        weight = torch.empty(shape, dtype=getattr(torch, dtype))
        self.sync.broadcast(weight, src=0)
        self.got[name] = weight

    def received(self) -> dict[str, torch.Tensor]:
        return self.got


def test_spread_places_role_groups_on_different_nodes(tmp_path, tiny_rm, prompts):
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        cfg = PPOConfig(**{
            **_small(tiny_rm), "total_episodes": 4, "ppo_epochs": 1, "placement_strategy": "SPREAD",
            "colocate": [["policy", "reference"], ["critic", "reward"]],
        })
        out = run_ppo(cfg, tmp_path / "spread", prompts)
        nodes = json.loads((out / "placement.json").read_text())
        assert nodes["policy"] == nodes["reference"] and nodes["critic"] == nodes["reward"]
        groups = {nodes["policy"][0], nodes["critic"][0], nodes["rollout"][0]}
        assert len(groups) == 3, nodes
        alive = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        assert alive == []
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:
            start_local_ray()
