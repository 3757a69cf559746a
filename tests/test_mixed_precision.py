"""Mixed precision as the field does it: fp32 master weights and AdamW state, bf16 compute.

At the paper's PPO learning rate (1e-6, ALMoST Appendix D.3) one AdamW step moves a weight by about
1e-6, while bf16's spacing near a weight of 0.02 is about 1.2e-4: updated in place, a bf16 weight rounds
back to itself. With fp32 master weights every step lands. Measured on the decoder blocks: the embedding
rows of tokens that never occur get no gradient at any precision.
"""

from __future__ import annotations

import json

import torch
from conftest import run_config

from almost_ray.models.loading import load_tokenizer, resolve_model_dir
from almost_ray.rl.config import PPOConfig
from almost_ray.train.config import TrainSFTConfig

PAPER_LR = 1e-6


def changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of the decoder blocks' entries that differ between two state dicts."""
    keys = [k for k in before if ".layers." in k]
    changed = sum(int((before[k] != after[k].to(before[k].dtype)).sum()) for k in keys)
    return changed / sum(before[k].numel() for k in keys)


def _episodes(n: int = 4) -> dict:
    tokenizer = load_tokenizer("tiny:llama")
    prompts = [tokenizer(f"\n\nHuman: question {i}\n\nAssistant:", add_special_tokens=False).input_ids
               for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, 1000, (5,), generator=gen).tolist() for _ in range(n)]
    return {"prompt_ids": prompts, "response_ids": responses}


def test_bf16_updates_survive_at_paper_lr(tmp_path, tiny_rm):
    """bf16 compute at lr 1e-6: after 10 steps at least 90 % of the master weights' entries have moved, for
    a model trained by the training loop and for PPO's policy and critic (which stay fp32). The same 10 steps
    applied to bf16 weights in place move almost none: the failure this guards against."""
    from transformers import AutoModelForCausalLM

    from almost_ray.rl.roles import CriticActor, PolicyActor
    from almost_ray.train import sft

    # the training loop (train-sft), in the driver process, bf16 autocast over fp32 weights
    with open(tmp_path / "dialogues.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Name a number near {i}."},
                                             {"role": "assistant", "content": f"{i} and {i + 1}."}]}) + "\n")
    cfg = TrainSFTConfig(model="tiny:llama", num_workers=0, epochs=10, global_batch_size=10, micro_batch_size=10,
                         lr=PAPER_LR, warmup_ratio=0.0, min_lr_ratio=1.0, max_length=64, mixed_precision="bf16",
                         dialogues=str(tmp_path / "dialogues.jsonl"), output_dir=tmp_path / "sft")
    out = sft.run(run_config(tmp_path, train_sft=cfg)) / "model"
    start = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama")).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert changed_share(start, trained) >= 0.9

    # PPO: dtype bfloat16 is the compute dtype; the policy and critic keep fp32 masters
    ppo = PPOConfig(dtype="bfloat16", lr=PAPER_LR, min_lr=PAPER_LR, critic_lr=PAPER_LR, rollout_batch_size=4,
                    minibatch_size=4, micro_batch_size=4, torch_threads=2, total_episodes=4).model_dump(mode="json")
    batch = _episodes()
    policy, critic = PolicyActor(ppo, "tiny:llama"), CriticActor(ppo, str(tiny_rm))
    assert policy.bf16 and critic.bf16
    old = policy.logprobs(batch, 5)
    values = critic.values(batch, 5)
    gen = torch.Generator().manual_seed(1)
    piece = {**batch, "old_logprobs": old, "advantages": torch.randn(4, 5, generator=gen),
             "old_values": values, "returns": values + torch.randn(4, 5, generator=gen)}
    for actor in (policy, critic):
        before = {k: v.clone() for k, v in actor.model.state_dict().items()}
        assert all(v.dtype == torch.float32 for v in before.values())
        for _ in range(10):
            actor.train_step(piece, minibatch_tokens=20.0, width=5)
        assert changed_share(before, actor.model.state_dict()) >= 0.9, actor.role

    # the failure mode: the same kind of update applied to bf16 weights in place leaves nearly all unchanged
    weights = (torch.randn(256, 256, generator=gen) * 0.02).to(torch.bfloat16)
    start_bf16 = weights.clone()
    param = torch.nn.Parameter(weights)
    opt = torch.optim.AdamW([param], lr=PAPER_LR, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(10):
        param.grad = torch.randn(256, 256, generator=gen).to(torch.bfloat16)
        opt.step()
    assert (param.detach() != start_bf16).float().mean() < 0.1
