"""GPU memory of one replica, per GPU, in bytes: pure functions of a model's shape and the run's settings.

Trainable models (ALMoST's RM, SFT, PPO policy and critic) keep fp32 master weights, fp32 gradients and
AdamW's two fp32 moments: 16 bytes a parameter, divided over the FSDP2 shards. DeepSpeed's ZeRO-3 estimate
(`deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`, offload off) is 18 bytes a
parameter over the GPUs plus 4 bytes of the largest layer: it also keeps a bf16 copy of each shard, where
FSDP2 all-gathers bf16 from the fp32 shard on the fly (`tests/test_plan.py` checks ours against it).

On top of the states: the bf16 weights being computed with (FSDP2's gathered units: the one computing, the
prefetched next, and one unit's unsharded gradient with its fp32 reduce-scatter buffer; unsharded under
autocast, the bf16 copy of every weight, which autocast keeps for backward), the activations of one
micro-batch, the kept logits rows, and the CUDA context of the process. The activations are freed block by
block during backward while the gradients fill in, so the peak holds the larger of the two, not both.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
Section 4.1), written out for a transformers LLaMA block under bf16 compute with a fused attention kernel (no
s x s score matrix): per token, each RMSNorm keeps its fp32 input and bf16 output (2 x 6h bytes); attention
keeps its input 2h, q and k with their rotate_half for RoPE 4h + 4kv, the q, k, v its kernel saves 2h + 4kv,
its output 2h and o_proj's input 2h; the MLP its input 2h and the gate, up, SiLU and product tensors 8i. With
activation checkpointing (transformers' per-block, non-reentrant) a block keeps only its 2h-byte input and
one block at a time is recomputed in backward. Measured on an H200 (torch 2.11, transformers 5.17, LLaMA-7B
shapes, 2 560 tokens): 55.6h bytes per token and block kept for backward under autocast besides the bf16
weight copies (this formula: 55.5h); the whole 7B with checkpointing peaked at 108.0 GB (this model, without
the context: 108.4 GB); a no-grad forward of 32 768 tokens 24h per token above the weights and the KV cache
transformers builds by default (here 12h + 6i = 28.1h) (docs/gpu-cluster.md, "The plan").

vLLM preallocates `gpu_memory_utilization` of each GPU of its tensor-parallel group for weights, activations
and KV cache; the plan counts that fraction and checks that the weights and one full-length sequence of KV
cache fit inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from almost_ray.plan.shapes import ModelShape

GIB = 2**30
CUDA_CONTEXT = 1 * GIB  # a torch process's CUDA context, cuBLAS workspace and NCCL buffers (about 0.5-1 GiB)
STATE_BYTES = 16  # fp32 master weight 4 + fp32 gradient 4 + AdamW's two fp32 moments 8
COMPUTE_BYTES = 2  # bf16
VLLM_PROFILE_TOKENS = 8192  # tokens of vLLM's profiling forward pass (its default max_num_batched_tokens)


@dataclass(frozen=True)
class Estimate:
    """One replica's bytes on each of its GPUs, by part (all bytes per GPU)."""

    weights: float = 0.0  # frozen or vLLM weights in their dtype
    states: float = 0.0  # master weights, gradients, AdamW moments (trainable)
    gradients: float = 0.0  # the part of `states` that fills in during backward as the activations are freed
    gathered: float = 0.0  # bf16 weights being computed with: FSDP2's gathered units, or autocast's copies
    activations: float = 0.0  # kept for backward (or a no-grad forward's peak)
    transient: float = 0.0  # one block's activations recomputed or their gradients, during backward
    logits: float = 0.0
    kv_cache: float = 0.0  # HF generation: its KV cache; vLLM: what its preallocation leaves for it
    context: float = 0.0
    reserved: float = 0.0  # vLLM: gpu_memory_utilization x the GPU, all of the above included
    autocast_copies: bool = False  # `gathered` is kept for backward like an activation (unsharded autocast)
    note: str = ""

    @property
    def total(self) -> float:
        if self.reserved:
            return self.reserved
        kept = self.activations + self.logits + (self.gathered if self.autocast_copies else 0.0)
        in_flight = 0.0 if self.autocast_copies else self.gathered
        return (self.weights + self.states - self.gradients + max(kept, self.gradients) + self.transient
                + in_flight + self.kv_cache + self.context)


def layer_activation_bytes(shape: ModelShape, tokens: int) -> float:
    """Activations one decoder block keeps for backward over `tokens` tokens (bf16 compute, fused attention)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    norms = 2 * (4 * h + 2 * h)  # each RMSNorm: fp32 input, bf16 normalised output
    attention = 2 * h + (4 * h + 4 * kv) + (2 * h + 4 * kv) + 2 * h + 2 * h  # input; RoPE; q, k, v; output; o_proj
    mlp = 2 * h + 8 * i  # shared gate/up input; gate, up, SiLU(gate), product
    return tokens * (norms + attention + mlp)


def training_activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    """Activations of one training micro-batch of `tokens` tokens kept for backward: every block's, or with
    checkpointing every block's input."""
    if checkpointing:
        return shape.layers * COMPUTE_BYTES * shape.hidden * tokens
    return shape.layers * layer_activation_bytes(shape, tokens)


def inference_activation_bytes(shape: ModelShape, tokens: int) -> float:
    """Peak of a no-grad forward over `tokens` tokens: one block's intermediate tensors live at once."""
    return tokens * (12 * shape.hidden + 6 * shape.intermediate)


def logits_bytes(rows: int, vocab: int, training: bool) -> float:
    """The LM head's kept rows: bf16 logits, their fp32 copy and fp32 log-softmax at the forward's peak; in
    training the log-softmax (kept for backward) and its fp32 gradient, with the bf16 logits' gradient."""
    return rows * vocab * ((4 + 4 + 2 + 2) if training else (2 + 4 + 4))


def gathered_unit_bytes(shape: ModelShape, head: str, trainable: bool) -> float:
    """What FSDP2 holds whole at a time: the unit computing and the prefetched next in bf16; when training,
    also the unit's unsharded bf16 gradient and its fp32 reduce-scatter buffer."""
    unit = max(shape.layer_params, shape.root_params(head))
    return unit * (2 * COMPUTE_BYTES + ((COMPUTE_BYTES + 4) if trainable else 0))


def trainable_replica(shape: ModelShape, head: str, shards: int, tokens: int, logit_rows: int,
                      checkpointing: bool, bf16: bool = True) -> Estimate:
    """A trained model (Ray Train worker, PPO policy or critic) on each of its GPUs: FSDP2 over `shards`
    replicas (one: unsharded, with autocast's bf16 copies of the weights under bf16 compute)."""
    params = shape.params(head)
    sharded = shards > 1
    return Estimate(
        states=STATE_BYTES * params / shards,
        gradients=4 * params / shards,
        gathered=(gathered_unit_bytes(shape, head, True) if sharded else
                  COMPUTE_BYTES * params if bf16 else 0.0),
        autocast_copies=bf16 and not sharded,
        activations=training_activation_bytes(shape, tokens, checkpointing),
        transient=layer_activation_bytes(shape, tokens),
        logits=logits_bytes(logit_rows, shape.vocab, True) if head == "lm" else 0.0,
        context=CUDA_CONTEXT,
    )


def frozen_replica(shape: ModelShape, head: str, dtype_bytes: int, shards: int, tokens: int,
                   logit_rows: int, kv_tokens: int = 0) -> Estimate:
    """A model that only scores (PPO reference and reward, an RM pool) or generates with HF (`kv_tokens` of KV
    cache) on each of its GPUs."""
    return Estimate(
        kv_cache=shape.kv_bytes_per_token(dtype_bytes) * kv_tokens,
        weights=dtype_bytes * shape.params(head) / shards,
        gathered=gathered_unit_bytes(shape, head, False) if shards > 1 else 0.0,
        activations=inference_activation_bytes(shape, tokens),
        logits=logits_bytes(logit_rows, shape.vocab, False) if head == "lm" else 0.0,
        context=CUDA_CONTEXT,
    )


def vllm_replica(shape: ModelShape, tensor_parallel: int, utilization: float, gpu_bytes: float,
                 max_model_len: int, dtype_bytes: int = 2) -> Estimate:
    """A vLLM engine on each GPU of its tensor-parallel group: `utilization` of the GPU, and what is left
    in it for the KV cache after the weights and the profiling pass's activations."""
    weights = dtype_bytes * shape.params("lm") / tensor_parallel
    activations = inference_activation_bytes(shape, VLLM_PROFILE_TOKENS) / tensor_parallel
    reserved = utilization * gpu_bytes
    kv = reserved - weights - activations - CUDA_CONTEXT
    need = shape.kv_bytes_per_token(dtype_bytes) * max_model_len / tensor_parallel
    note = ""
    if kv < 0:
        note = (f"vLLM: gpu_memory_utilization {utilization:g} of {gpu_bytes / GIB:g} GiB is {reserved / GIB:.1f} GiB "
                f"per GPU, less than the weights ({weights / GIB:.1f} GiB at tensor parallel {tensor_parallel}) and "
                f"activations: short by {(need - kv) / GIB:.1f} GiB with one {max_model_len}-token sequence of KV cache")
    elif kv < need:
        note = (f"vLLM: {utilization:g} of the GPU leaves {kv / GIB:.1f} GiB for the KV cache, one "
                f"{max_model_len}-token sequence needs {need / GIB:.2f} GiB")
    return Estimate(weights=weights, activations=activations, kv_cache=max(kv, 0.0), context=CUDA_CONTEXT,
                    reserved=reserved, note=note)


def zero3_gpu_bytes(total_params: int, largest_layer_params: int, gpus: int) -> float:
    """DeepSpeed's ZeRO-3 model-state estimate per GPU without offload (`estimate_zero3_model_states_mem_needs`,
    deepspeed/runtime/zero/stage3.py): 4 bytes of the largest layer + 18 bytes a parameter over the GPUs."""
    return 4 * largest_layer_params + 18 * total_params / gpus
