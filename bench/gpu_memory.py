"""Measured GPU memory of one training replica and one scoring replica, to check `almost_ray.plan.memory`.

Runs on one CUDA GPU with torch and transformers only (no almost_ray import: the GPU machine has neither
pydantic nor Ray). LLaMA-7B's shape (random weights), fp32 master weights and fused AdamW, bf16 autocast,
SDPA attention, the LM head applied only to the last `--response` positions, as PPO's policy does. Cases:
the whole 7B with activation checkpointing (the states dominate), and a 4-block model with and without it
(the activations dominate); and a 7B reward model's no-grad forward with transformers' default KV cache on
(what `RewardModel` switches off). Prints one JSON object: per case, `torch.cuda.max_memory_allocated` after
two optimizer steps (or the forward). docs/gpu-cluster.md has the numbers of an H200 and the plan's.

    python bench/gpu_memory.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def context_bytes() -> int:
    free_before, total = torch.cuda.mem_get_info()
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    return max(0, free_before - free_after)


def train_case(layers: int, batch: int, seq: int, response: int, checkpointing: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.cuda.empty_cache()
    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)  # fp32 master weights
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, logits_to_keep=response).logits
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -response:, None])
        logprobs.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    params = sum(p.numel() for p in model.parameters())
    del model, opt, logits, logprobs
    return {"layers": layers, "params": params, "tokens": batch * seq, "response_rows": batch * response,
            "checkpointing": checkpointing, "peak_allocated": peak, "step_s": times}


def score_case(layers: int, batch: int, seq: int) -> dict:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.cuda.empty_cache()
    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=layers, num_labels=1, pad_token_id=0,
                         attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForSequenceClassification(config).to(torch.bfloat16).eval()
    ids = torch.randint(1, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"layers": layers, "params": params, "tokens": batch * seq, "peak_allocated": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context_seen": context_bytes(),
           "train": [], "score": []}
    import transformers

    out["transformers"] = transformers.__version__
    # PPO's policy micro-batch in the paper config: 4 episodes of 512 + 128 tokens, head on the 128
    for layers, ckpt in ((4, False), (4, True), (32, True)):
        out["train"].append(train_case(layers, 4, 640, 128, ckpt))
        print(json.dumps(out["train"][-1]), flush=True)
    for layers, batch, seq in ((32, 4, 640), (32, 32, 1024)):
        out["score"].append(score_case(layers, batch, seq))
        print(json.dumps(out["score"][-1]), flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
