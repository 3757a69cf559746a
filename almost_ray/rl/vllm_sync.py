"""The vLLM worker extension that receives the policy's weights (GPU only; imported inside vLLM workers).

vLLM 0.29 (the [gpu] extra's, Ray 2.60's `llm` pin) mixes the class named by
`LLM(worker_extension_cls=...)` into each worker, and `LLM.collective_rpc(method, args)` calls its methods
on every worker. `init_weight_sync` joins an NCCL group whose rank 0 is the policy's rank 0 (vLLM's
`StatelessProcessGroup` + `PyNcclCommunicator`, which do not touch the global torch.distributed group);
`update_weight` receives one broadcast tensor and hands it to the model's own `load_weights`, which knows
the HF-name-to-vLLM-layout mapping.
"""

from __future__ import annotations

import torch


class WeightSync:
    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.weight_sync = PyNcclCommunicator(group, device=self.device)

    def update_weight(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        weight = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        self.weight_sync.broadcast(weight, src=0, stream=torch.cuda.current_stream())
        self.model_runner.model.load_weights(weights=[(name, weight)])

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model_runner.model.load_weights(weights=[(k, v.to(self.device)) for k, v in state_dict.items()])
