"""PPO roles, rollout engines, placement plan and stage validation (fast; tiny:llama).

The runs with Ray actors (data-parallel replicas, planted reward, resume, multi-node placement, the
stage end to end) are in tests/test_rl_ppo_slow.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_ppo
from pydantic import ValidationError

from almost_ray.config_base import ConfigError
from almost_ray.data.records import RecordError
from almost_ray.models.loading import ModelRefError, load_tokenizer, resolve_model_dir
from almost_ray.rl import stage
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.roles import plan_bundles
from almost_ray.rl.rollout import old_logprobs_source, vllm_engine_kwargs, vllm_sampling_kwargs
from almost_ray.rl.trainer import prompt_order

SMALL = dict(rollout_batch_size=4, minibatch_size=2, micro_batch_size=2, ppo_epochs=1, max_new_tokens=6,
             total_episodes=4, torch_threads=1, dtype="float32")


def test_plan_bundles_colocated_roles_share_bundles():
    cfg = PPOConfig(
        colocate=[["policy", "reference"], ["critic", "reward"]],
        policy_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
        reference_resources={"replicas": 1, "num_cpus": 1, "num_gpus": 0.5},
        critic_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
        reward_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
        rollout={"engines": 2, "num_cpus": 2, "num_gpus": 1},
    )
    bundles, where = plan_bundles(cfg)
    assert bundles == [
        {"CPU": 2, "GPU": 1}, {"CPU": 1, "GPU": 0.5},  # policy x2 + reference x1
        {"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1},  # critic + reward
        {"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1},  # rollout engines
    ]
    assert where == {"policy": [0, 1], "reference": [0], "critic": [2, 3], "reward": [2, 3], "rollout": [4, 5]}


def test_plan_bundles_separate_roles_and_empty_bundle():
    bundles, where = plan_bundles(PPOConfig())
    assert len(bundles) == 5 and all(b == {"CPU": 1} for b in bundles)
    assert where["rollout"] == [4]
    with pytest.raises(ConfigError, match="reserve no CPU or GPU"):
        plan_bundles(PPOConfig(reward_resources={"num_cpus": 0}))
    with pytest.raises(ConfigError, match="more than one GPU"):
        plan_bundles(PPOConfig(colocate=[["policy", "reference"]], policy_resources={"num_gpus": 1},
                               reference_resources={"num_gpus": 0.5}))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_plan_no_critic(estimator):
    """No critic bundle, also when `colocate` names it (the demo colocates all four roles)."""
    cfg = PPOConfig(advantage_estimator=estimator, rollout_batch_size=16, minibatch_size=8,
                    colocate=[["policy", "critic", "reference", "reward"]],
                    **{f"{r}_resources": {"num_cpus": 0.25} for r in ("policy", "critic", "reference", "reward")})
    bundles, where = plan_bundles(cfg)
    assert "critic" not in where and cfg.roles == ("policy", "reference", "reward")
    assert bundles == [{"CPU": 0.75}, {"CPU": 1.0}] and where["rollout"] == [1]
    separate, where = plan_bundles(PPOConfig(advantage_estimator=estimator, rollout_batch_size=16, minibatch_size=8,
                                             colocate=[["critic", "reward"]]))
    assert len(separate) == 4 and set(where) == {"policy", "reference", "reward", "rollout"}


def test_group_estimators_sample_groups_of_responses():
    assert PPOConfig(advantage_estimator="grpo").n_samples_per_prompt == 4  # a group even when unset
    assert PPOConfig(advantage_estimator="reinforce_pp").n_samples_per_prompt == 1
    cfg = PPOConfig(advantage_estimator="rloo", n_samples_per_prompt=8, rollout_batch_size=64, minibatch_size=16)
    assert cfg.prompts_per_iteration == 8 and cfg.iterations == 80_000 // 64
    with pytest.raises(ValidationError, match="n_samples_per_prompt must be 2 or more"):
        PPOConfig(advantage_estimator="dr_grpo", n_samples_per_prompt=1)
    with pytest.raises(ValidationError, match="multiple of n_samples_per_prompt"):
        PPOConfig(n_samples_per_prompt=3, rollout_batch_size=16, minibatch_size=8)
    with pytest.raises(ValidationError, match="gamma must be 1"):
        PPOConfig(advantage_estimator="grpo", gamma=0.99)
    with pytest.raises(ValidationError, match="advantage_estimator"):
        PPOConfig(advantage_estimator="group_norm")  # OpenRLHF's name is not ours


def test_ppo_grpo_is_the_ppo_section_with_its_own_fields_changed(tmp_path):
    from almost_ray.config import load_config
    from almost_ray.rl import ppo_grpo

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(demo)
    p = ppo_grpo.settings(cfg)
    assert (p.advantage_estimator, p.n_samples_per_prompt, p.use_kl_loss, p.kl_estimator) == ("grpo", 4, True, "k3")
    assert p.model_dump(exclude={"advantage_estimator", "n_samples_per_prompt", "use_kl_loss", "kl_estimator"}) == \
        cfg.ppo.model_dump(exclude={"advantage_estimator", "n_samples_per_prompt", "use_kl_loss", "kl_estimator"})
    assert p.roles == ("policy", "reference", "reward") and p.prompts_per_iteration == 4
    # a field left null takes ppo's value, a group size ppo sets is kept, the folder is its own
    cfg = load_config(demo, ["ppo_grpo.n_samples_per_prompt=null", "ppo.lr=3e-6", "ppo.n_samples_per_prompt=8",
                             "ppo.rollout_batch_size=32", f"runs_dir={tmp_path}"])
    p = ppo_grpo.settings(cfg)
    assert (p.n_samples_per_prompt, p.lr, p.output_dir) == (8, 3e-6, None)
    assert ppo_grpo.STAGE.stage_dir(cfg) == tmp_path / "demo" / "ppo_grpo" != stage.STAGE.stage_dir(cfg)
    assert ppo_grpo.STAGE.outputs(cfg) == {"model": tmp_path / "demo" / "ppo_grpo" / "model"}
    # the merged settings are checked before Ray starts, naming the section
    with pytest.raises(ConfigError, match="ppo_grpo: .*gamma must be 1 with advantage_estimator rloo"):
        ppo_grpo.check(load_config(demo, ["ppo_grpo.advantage_estimator=rloo", "ppo.gamma=0.9"]))
    with pytest.raises(ConfigError, match="ppo_grpo: .*must be a multiple of n_samples_per_prompt"):
        ppo_grpo.settings(load_config(demo, ["ppo_grpo.n_samples_per_prompt=3"]))
    with pytest.raises(ConfigError, match="ppo_grpo.advantage_estimator"):
        load_config(demo, ["ppo_grpo.advantage_estimator=gae"])  # the variant is critic-free by definition


def test_config_rejects_unknown_role_and_uneven_minibatches():
    with pytest.raises(ValidationError, match="colocate"):
        PPOConfig(colocate=[["policy", "value"]])
    with pytest.raises(ValidationError, match="multiple of minibatch_size"):
        PPOConfig(rollout_batch_size=10, minibatch_size=4)


def test_prompt_order_is_seeded_and_covers_each_pass():
    first = [i for it in range(3) for i in prompt_order(6, it, 2, seed=0)]
    assert sorted(first) == list(range(6))
    assert prompt_order(6, 1, 2, seed=0) == prompt_order(6, 1, 2, seed=0)
    second = [i for it in range(3, 6) for i in prompt_order(6, it, 2, seed=0)]
    assert sorted(second) == list(range(6)) and second != first  # the next pass is shuffled afresh
    assert prompt_order(6, 0, 6, seed=0) != prompt_order(6, 0, 6, seed=1)


def test_vllm_arguments():
    cfg = PPOConfig(max_prompt_tokens=256, max_new_tokens=64, rollout={"tensor_parallel_size": 2,
                                                                       "gpu_memory_utilization": 0.4})
    kwargs = vllm_engine_kwargs(cfg, "/models/sft")
    assert kwargs["worker_extension_cls"] == "almost_ray.rl.vllm_sync.WeightSync"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["max_model_len"] == 320 and kwargs["gpu_memory_utilization"] == 0.4
    assert kwargs["enable_prefix_caching"] is False and kwargs["trust_remote_code"] is False
    assert vllm_sampling_kwargs(cfg, 7) == dict(n=1, temperature=1.0, top_p=1.0, max_tokens=64, seed=7,
                                                skip_special_tokens=False)


# ------------------------------------------------------------------------------------- stage input checks
@pytest.fixture()
def no_actors(monkeypatch):
    """Fail the test if the stage gets as far as starting Ray."""
    import almost_ray.cluster.connect

    def refuse(_cfg):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(almost_ray.cluster.connect, "init_ray", refuse)


def _rm_dir(tmp_path):
    """A one-output RM made from tiny:llama (as `train-rm` saves one)."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    if not out.exists():
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir("tiny:llama"), num_labels=1)
        model.save_pretrained(out)
        load_tokenizer("tiny:llama").save_pretrained(out)
    return out


def test_bad_inputs_fail_before_any_actor(tmp_path, no_actors):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a cat?\n")
    run_dir = tmp_path / "run"
    with pytest.raises(ModelRefError, match=r"ppo.policy: .*sft/model.*train-sft"):
        run_ppo(PPOConfig(**SMALL), run_dir, prompts)
    with pytest.raises(ModelRefError, match=r"ppo.reward_model: .*train-rm"):
        run_ppo(PPOConfig(policy="tiny:llama", **SMALL), run_dir, prompts)
    with pytest.raises(ModelRefError, match="not a reward model"):  # a causal LM
        run_ppo(PPOConfig(policy="tiny:llama", reward_model="tiny:llama", **SMALL), run_dir, prompts)
    rm = _rm_dir(tmp_path)
    cfg = PPOConfig(policy="tiny:llama", reward_model=str(rm), **SMALL)
    with pytest.raises(RecordError, match=r"rmsp/dialogues.jsonl: file not found"):
        run_ppo(cfg, run_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(RecordError, match="no rows"):
        run_ppo(cfg, run_dir, empty)
    with pytest.raises(RecordError, match="longer than ppo.max_prompt_tokens"):
        run_ppo(cfg.model_copy(update={"max_prompt_tokens": 8}), run_dir,
                  _write(tmp_path / "long.txt", "word " * 50))


def _write(path, text):
    path.write_text(text)
    return path


def test_prompts_are_first_user_turns(tmp_path):
    from almost_ray.rl.prompt_data import load_prompts

    dialogues = tmp_path / "dialogues.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": " How do I bake bread? "}, {"role": "assistant", "content": "Knead."},
                      {"role": "user", "content": "And then?"}]},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]},
    ]
    dialogues.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(dialogues) == ["How do I bake bread?", "Hi"]
    queries = _write(tmp_path / "q.jsonl", json.dumps({"id": "a", "text": "Why is the sky blue?"}) + "\n")
    assert load_prompts(queries) == ["Why is the sky blue?"]
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match="bad.jsonl:1"):
        load_prompts(bad)


def test_prompts_render_in_the_sft_format():
    tokenizer = load_tokenizer("tiny:llama")
    encoded, dropped = stage.encode_prompts(["Name a fruit."], tokenizer, PPOConfig())
    assert dropped == 0
    assert tokenizer.decode(encoded[0].ids) == "\n\nHuman: Name a fruit.\n\nAssistant:"
    assert encoded[0].text == "Name a fruit."


# ------------------------------------------------------------------------------------- actors in-process
def _episodes(tokenizer, n=3):
    prompts = [tokenizer(f"\n\nHuman: question {i}\n\nAssistant:", add_special_tokens=False).input_ids for i in range(n)]
    return prompts


def test_engine_log_probs_equal_policy_after_weight_sync():
    """A policy update, then `load_weights` of its state dict: the engine scores tokens as the policy does."""
    from almost_ray.rl.roles import PolicyActor
    from almost_ray.rl.rollout import HFRolloutEngine

    cfg = PPOConfig(**{**SMALL, "lr": 1e-2, "torch_threads": 2}).model_dump(mode="json")
    policy = PolicyActor(cfg, "tiny:llama")
    engine = HFRolloutEngine(cfg, "tiny:llama")
    prompts = _episodes(engine.generator.tokenizer)
    responses, ended, sampled = engine.generate(prompts, seeds=[1, 2, 3])
    assert all(len(r) == 6 for r in responses) and ended == [False] * 3
    # seeded per episode: the same seed gives the same response alone or in another batch
    alone, _, _ = engine.generate(prompts[1:2], seeds=[2])
    assert alone[0] == responses[1]
    batch = {"prompt_ids": prompts, "response_ids": responses}
    width = 6
    before = policy.logprobs(batch, width)
    assert torch.allclose(engine.logprobs(prompts, responses), before, atol=1e-5)
    # the log-probs the engine sampled with are the policy's: PPO reuses them as pi_old (old_logprobs: auto)
    assert torch.allclose(torch.tensor(sampled), before, atol=1e-4)
    assert old_logprobs_source(PPOConfig(**SMALL)) == "rollout"
    assert old_logprobs_source(PPOConfig(**{**SMALL, "dtype": "bfloat16"})) == "policy"
    assert old_logprobs_source(PPOConfig(**{**SMALL, "mixed_precision": "bf16"})) == "policy"
    piece = {**batch, "old_logprobs": before, "advantages": torch.ones(3, width)}
    policy.train_step(piece, minibatch_tokens=18.0, width=width)
    after = policy.logprobs(batch, width)
    assert not torch.allclose(after, before, atol=1e-3)
    assert not torch.allclose(engine.logprobs(prompts, responses), after, atol=1e-3)
    engine.load_weights(policy.weights())
    assert torch.allclose(engine.logprobs(prompts, responses), after, atol=1e-5)


def test_bf16_mixed_precision_trains_fp32_weights():
    """`mixed_precision: bf16`: the policy's forward runs under bf16 autocast (its log-probs differ from
    fp32's, a little), the weights and the optimizer stay fp32, and a step still moves them."""
    from almost_ray.rl.roles import PolicyActor

    fp32 = PolicyActor(PPOConfig(**{**SMALL, "lr": 1e-2}).model_dump(mode="json"), "tiny:llama")
    bf16 = PolicyActor(PPOConfig(**{**SMALL, "lr": 1e-2, "mixed_precision": "bf16"}).model_dump(mode="json"),
                       "tiny:llama")
    tokenizer = load_tokenizer("tiny:llama")
    prompts = _episodes(tokenizer)
    batch = {"prompt_ids": prompts, "response_ids": [[11, 12, 13], [14, 15], [16, 17, 18]]}
    exact, mixed = fp32.logprobs(batch, 3), bf16.logprobs(batch, 3)
    assert not torch.equal(exact, mixed) and torch.allclose(exact, mixed, atol=0.1)
    before = {k: v.clone() for k, v in bf16.model.state_dict().items()}
    bf16.train_step({**batch, "old_logprobs": mixed, "advantages": torch.ones(3, 3)}, minibatch_tokens=8.0, width=3)
    after = bf16.model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_dirs_are_complete_or_absent(tmp_path):
    from almost_ray.data.atomic import atomic_directory as atomic_dir
    from almost_ray.data.metrics_log import MetricsLog
    from almost_ray.rl.checkpoint import CHECKPOINTS, checkpoint_dirs

    root = tmp_path / CHECKPOINTS
    with atomic_dir(root / "iter_0000002") as tmp:
        (tmp / "state.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(root / "iter_0000004") as tmp:
        (tmp / "state.json").write_text("{}")
        raise RuntimeError("killed while writing")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_0000002"]
    assert [p.name for p in root.iterdir()] == ["iter_0000002"]  # the half-written one is gone
    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until=0, key="iteration")
    for it in (1, 2, 3):
        log.write({"iteration": it})
    MetricsLog(tmp_path / "metrics.jsonl", keep_until=2, key="iteration")  # resuming after iteration 2
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_response_logprobs_and_values_read_only_where_responses_are(padding_free):
    """Prompts of different lengths, responses of different lengths, padded rows or one packed row: the
    log-probs equal those read off each episode's full logits, the LM head ran only on the 7 rows that
    predict a response token (not on prompt or pad positions), and the critic's values equal its score
    head on each episode's own hidden states."""
    from transformers import AutoModelForSequenceClassification

    from almost_ray.models.loading import load_causal_lm, resolve_model_dir
    from almost_ray.models.packing import use_packed_attention
    from almost_ray.rl.episodes import pack, response_logprobs, response_values

    model = load_causal_lm("tiny:llama", "float32", device="cpu").eval()
    torch.manual_seed(0)
    critic = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir("tiny:llama"), num_labels=1).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([p + r])).logits[0] for p, r in zip(prompts, responses)]
        hidden = [critic.model(input_ids=torch.tensor([p + r])).last_hidden_state[0] for p, r in zip(prompts, responses)]
    if padding_free:
        use_packed_attention(model)
        use_packed_attention(critic)
    packed = pack(prompts, responses, pad_id=0, width=4, padding_free=padding_free)
    assert packed.input_ids.shape == ((1, 26) if padding_free else (3, 10))
    rows_seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: rows_seen.append(args[0].shape))
    with torch.no_grad():
        got = response_logprobs(model, packed, temperature=0.7)
        values = response_values(critic, packed)
    hook.remove()
    want, want_values = torch.zeros(3, 4), torch.zeros(3, 4)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        logprobs = torch.log_softmax(alone[b] / 0.7, -1)
        for j, token in enumerate(r):
            want[b, j] = logprobs[len(p) - 1 + j, token]
            want_values[b, j] = critic.score(hidden[b][len(p) - 1 + j]).item()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, want_values, atol=1e-5, rtol=1e-5)
    assert [shape[0] for shape in rows_seen] == [7]  # 2 + 4 + 1 response tokens, nothing else


def test_weights_travel_as_arrays_in_any_dtype(ray_local):
    """The CPU weight sync (rl/weights.py): float32 and bfloat16 (which numpy lacks) arrive bit for bit,
    through Ray's object store as read-only arrays, and a state dict of another model is refused."""
    from almost_ray.rl.weights import load_arrays, to_arrays

    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, dtype=torch.bfloat16))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, dtype=torch.bfloat16))
    arrays = ray_local.get(ray_local.put(to_arrays(src.state_dict())))  # zero-copy: read-only arrays
    assert not next(iter(arrays.values()))[0].flags.writeable
    load_arrays(dst, arrays)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with pytest.raises(ValueError, match="missing"):
        load_arrays(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)),
                    to_arrays(src.state_dict()))


def test_every_weight_sync_communicator_is_on_an_indexed_device(monkeypatch):
    """vLLM's `PyNcclCommunicator` asserts each tensor's device equals its own, and `cuda` is not `cuda:0`:
    the policy's role device is the GPU Ray gave it BY INDEX, and that is the device its weight-sync
    communicator is built on (vLLM is not installed here: its two classes are stood in for by recorders)."""
    import sys
    import types

    from almost_ray.rl.roles import PolicyActor, role_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert role_device(1) == torch.device("cuda", 3) and role_device(0.5).index == 3
    assert role_device(0) == torch.device("cpu")
    monkeypatch.undo()

    built = []

    class Communicator:
        def __init__(self, group, device):
            built.append(device)

    class Group:
        @staticmethod
        def create(host, port, rank, world_size):
            return (host, port, rank, world_size)

    pynccl = types.SimpleNamespace(PyNcclCommunicator=Communicator)
    utils = types.SimpleNamespace(StatelessProcessGroup=Group)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators",
                        types.ModuleType("vllm.distributed.device_communicators"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators.pynccl", pynccl)
    monkeypatch.setitem(sys.modules, "vllm.distributed.utils", utils)
    policy = PolicyActor(PPOConfig(**SMALL).model_dump(mode="json"), "tiny:llama")
    policy.device = torch.device("cuda", 0)  # what role_device gives an actor on its GPU
    policy.open_engine_sync("127.0.0.1", 1234, 3)
    assert built == [torch.device("cuda", 0)] and built[0].index is not None


def test_vllm_engines_get_placement_groups_of_their_own():
    """OpenRLHF's placement: vLLM engines leave the roles' group; each engine's group is one one-GPU bundle
    per tensor-parallel rank, and the engine actor tells vLLM which bundles (it holds no GPU above TP 1)."""
    from almost_ray.rl.roles import engine_bundles
    from almost_ray.rl.rollout import vllm_engine_env

    cfg = PPOConfig(colocate=[["policy", "reference"], ["critic", "reward"]],
                    policy_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
                    reference_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
                    critic_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
                    reward_resources={"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
                    rollout={"backend": "vllm", "engines": 2, "num_cpus": 4, "num_gpus": 1, "tensor_parallel_size": 2})
    bundles, where = plan_bundles(cfg, separate_engines=True)
    assert "rollout" not in where and len(bundles) == 4 and all(b["GPU"] == 1 for b in bundles)
    assert engine_bundles(cfg) == [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert vllm_engine_env(cfg) == {"VLLM_RAY_BUNDLE_INDICES": "0,1", "VLLM_RAY_PER_WORKER_GPUS": "1",
                                    "CUDA_VISIBLE_DEVICES": None}
    assert vllm_engine_env(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
        update={"tensor_parallel_size": 1})})) == {}
    assert vllm_engine_kwargs(cfg, "/m")["dtype"] == "bfloat16"  # auto is bf16 on GPU, what the policy sends
