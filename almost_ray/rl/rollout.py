"""Rollout engines: actors that only generate, refreshed with the policy's weights after every update.

As in OpenRLHF, generation runs in its own actors, apart from the trainable policy:

- `HFRolloutEngine` (CPU, or one GPU): `HFGenerator.generate_token_ids`, left-padded batches, one
  seeded sampler per episode (the seed is a function of the run seed, the iteration and the episode,
  so a resumed run samples exactly what an uninterrupted one does). Weights arrive through the Ray
  object store: the policy's state dict is put there once and every engine `load_state_dict`s it.
- `VLLMRolloutEngine` (GPU, `[gpu]` extra, imported lazily, vLLM 0.29's public API): `vllm.LLM` with
  `worker_extension_cls` = `almost_ray.rl.vllm_sync.WeightSync`; weights arrive by an NCCL broadcast
  from the policy's rank 0 (`collective_rpc("update_weight", ...)` on the engine side). It cannot run
  on this machine; `vllm_engine_kwargs`/`vllm_sampling_kwargs` are pure and tested.

Both return, per prompt, the response token ids (cut after EOS, which is kept), whether EOS came, and
the HF engine also the log-prob of each sampled token (`old_logprobs_source`).
"""

from __future__ import annotations

from typing import Any

import torch

from almost_ray.models.config import ModelConfig
from almost_ray.models.generator import vllm_available
from almost_ray.models.hf_backend import HFGenerator
from almost_ray.models.text import prompt_seed
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.episodes import pack, response_logprobs, split_rows
from almost_ray.rl.roles import RoleActor
from almost_ray.rl.weights import as_tensors, load_arrays

WEIGHT_SYNC_EXTENSION = "almost_ray.rl.vllm_sync.WeightSync"


def episode_seed(seed: int, prompt: str, episode: int) -> int:
    """The sampling seed of one episode: run seed, prompt and the episode's global number
    (iteration * rollout_batch_size + position), so it does not depend on batching or on a resume."""
    return prompt_seed(seed, prompt, episode)


def backend(cfg: PPOConfig) -> str:

    if cfg.rollout.backend == "auto":
        return "vllm" if vllm_available() and cfg.rollout.num_gpus > 0 else "hf"
    return cfg.rollout.backend


class HFRolloutEngine(RoleActor):
    """One HF generator holding a copy of the policy."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, "rollout", rank, world)

        model = ModelConfig(ref=model_dir, backend="hf", dtype=self.cfg.dtype,
                            max_batch_size=self.cfg.rollout.max_batch_size)
        self.generator = HFGenerator(model, device=self.device.type)

    def generate(self, prompt_ids: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool], list]:
        if not prompt_ids:
            return [], [], []
        return self.generator.generate_token_ids(
            prompt_ids, seeds, self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p
        )

    def load_weights(self, arrays: dict) -> None:
        """The policy's `weights()` (rl/weights.py), copied into this engine's model."""

        load_arrays(self.generator.model, arrays)

    @torch.no_grad()
    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """What this engine's weights give the responses: the check that a weight sync landed."""

        packed = pack(prompt_ids, response_ids, self.generator.tokenizer.pad_token_id).to(self.device)
        return response_logprobs(self.generator.model, packed, self.cfg.temperature).cpu()


def vllm_engine_kwargs(cfg: PPOConfig, model_dir: str) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one rollout engine (pure; tested without vLLM)."""
    tp = cfg.rollout.tensor_parallel_size
    return dict(
        model=str(model_dir),
        dtype="bfloat16" if cfg.dtype == "auto" else cfg.dtype,  # auto is bf16 on GPU, what the policy sends
        tensor_parallel_size=tp,
        distributed_executor_backend="ray" if tp > 1 else "uni",
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        worker_extension_cls=WEIGHT_SYNC_EXTENSION,
        enforce_eager=True,
        enable_prefix_caching=False,  # the weights change every iteration: cached prefixes would be stale
        max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
        trust_remote_code=False,
        seed=cfg.seed,
    )


def vllm_sampling_kwargs(cfg: PPOConfig, seed: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one episode (pure)."""
    return dict(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed,
                skip_special_tokens=False)


def vllm_engine_env(cfg: PPOConfig) -> dict[str, str | None]:
    """Environment of a vLLM engine actor (None: unset). At tensor parallel > 1 the actor holds no GPU and
    vLLM's Ray executor starts one worker per bundle of the engine's placement group, which the actor's
    scheduling strategy hands down (`placement_group_capture_child_tasks`): the bundle indices and one GPU
    per worker are passed as vLLM's `VLLM_RAY_BUNDLE_INDICES` / `VLLM_RAY_PER_WORKER_GPUS`, and Ray's empty
    `CUDA_VISIBLE_DEVICES` of a GPU-less actor is dropped (OpenRLHF's `BaseLLMRayActor` does the same)."""
    tp = cfg.rollout.tensor_parallel_size
    if tp == 1:
        return {}
    return {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(i) for i in range(tp)), "VLLM_RAY_PER_WORKER_GPUS": "1",
            "CUDA_VISIBLE_DEVICES": None}


class VLLMRolloutEngine(RoleActor):
    """One vLLM engine (GPU). The same `generate` as the HF engine; weights by NCCL broadcast."""

    def __init__(self, cfg: dict, model_dir: str, *, rank: int = 0, world: int = 1):
        import os

        for key, value in vllm_engine_env(PPOConfig.model_validate(cfg)).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        super().__init__(cfg, "rollout", rank, world)
        from vllm import LLM

        self.llm = LLM(**vllm_engine_kwargs(self.cfg, model_dir))

    def generate(self, prompt_ids: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool], list]:
        """The log-probs are not returned: vLLM's kernels are not the training forward's, so pi_old comes
        from the policy (`old_logprobs_source`)."""
        from vllm import SamplingParams, TokensPrompt

        if not prompt_ids:
            return [], [], []
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
            [SamplingParams(**vllm_sampling_kwargs(self.cfg, s)) for s in seeds],
            use_tqdm=False,
        )
        completions = [o.outputs[0] for o in outputs]
        return ([list(c.token_ids) for c in completions], [c.finish_reason == "stop" for c in completions],
                [[] for _ in completions])

    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("init_weight_sync", args=(host, port, rank_offset, world_size))

    def update_weight(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.llm.collective_rpc("update_weight", args=(name, dtype, shape))

    def load_weights(self, arrays: dict) -> None:
        """Object-store fallback (no NCCL group): the workers load the policy's `weights()`."""

        self.llm.collective_rpc("load_state_dict", args=(as_tensors(arrays),))


def engine_class(cfg: PPOConfig):
    return VLLMRolloutEngine if backend(cfg) == "vllm" else HFRolloutEngine


def sync_weights(policy: list, engines: list, vllm: bool) -> None:
    """Give every engine the policy's current weights (after each PPO update, before the next rollout).
    Every policy replica takes part: a sharded policy gathers its layers one at a time on all of them."""
    import ray

    if vllm:
        ray.get([p.broadcast_weights.remote(engines) for p in policy])
        return
    weights = [p.weights.remote() for p in policy]  # rank 0's: one copy in the object store, read by every engine
    ray.get([e.load_weights.remote(weights[0]) for e in engines] + weights[1:])


def open_vllm_sync(policy_rank0, engines: list, tensor_parallel_size: int) -> None:
    """The NCCL group of the policy's rank 0 (rank 0) and every vLLM worker (ranks 1..)."""
    import ray

    host, port = ray.get(policy_rank0.address.remote())
    world = 1 + len(engines) * tensor_parallel_size
    pending = [e.init_weight_sync.remote(host, port, 1 + i * tensor_parallel_size, world)
               for i, e in enumerate(engines)]
    ray.get([policy_rank0.open_engine_sync.remote(host, port, world), *pending])


def old_logprobs_source(cfg: PPOConfig) -> str:
    """Where pi_old's log-probs come from: `rollout` reuses the ones the engine sampled with (as TRL's
    PPO does), saving the policy a forward pass over the batch; `policy` recomputes them with the policy.

    `auto` reuses them only where the engine computes what the policy would: the HF engine in float32
    with the policy in fp32 too (the same model code; incremental decoding matches the full forward
    within 1e-4, tests/test_rl_ppo.py). vLLM's kernels and low-precision decoding or training drift from
    each other (the mismatch OpenRLHF and verl recompute or correct for), so there the policy recomputes
    them.
    """
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    policy_device = "cuda" if cfg.resources("policy").num_gpus > 0 else "cpu"
    same_numerics = cfg.dtype == "float32" and not cfg.bf16_compute(policy_device)
    return "rollout" if backend(cfg) == "hf" and same_numerics else "policy"


def generate_all(engines: list, prompt_ids: list[list[int]], seeds: list[int]
                 ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
    """Split the rollout batch across engines, in order; results keep the prompt order."""
    import ray


    parts = split_rows(len(prompt_ids), len(engines))
    refs = [e.generate.remote([prompt_ids[i] for i in r], [seeds[i] for i in r]) for e, r in zip(engines, parts)]
    responses, ended, logprobs = [], [], []
    for out, eos, lp in ray.get(refs):
        responses.extend(out)
        ended.extend(eos)
        logprobs.extend(lp)
    return responses, ended, logprobs

