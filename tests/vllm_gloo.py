"""The CPU-only parts of the OpenRLHF backend's weight sync, for the tests: its transport, and where vLLM's CPU build
keeps the weights.

- Transport. OpenRLHF 0.11.2 builds a NCCL communicator between policy rank 0 and the engines' workers (vLLM's
  PyNcclCommunicator, which silently disables itself without a GPU) and receives each weight into a "cuda" tensor
  (`WorkerWrap.update_weight`). Here both ends use a gloo group of the same ranks (vLLM's
  `stateless_init_torch_distributed_process_group`) and the worker receives into a CPU tensor. What the weight then
  goes through, `model_runner.model.load_weights` under the name the policy sent, is vLLM's real code.
- Weights. vLLM's CPU build repacks every linear layer's weight for oneDNN once the checkpoint is loaded and drops
  the weight itself, so `load_weights` has nothing to write into; on a GPU the weight stays where `load_weights`
  writes it. In the engines' worker process the layers keep their weight and multiply with it (vLLM's own fallback,
  `torch.nn.functional.linear`), as on a GPU.

`GlooWorkerWrap` is the engines' `worker_extension_cls`: vLLM imports this module in each worker process before it
loads the model (tests/ is on PYTHONPATH there), which installs the second point; the policy side imports
`stateless_init_process_group` from here.
"""

import torch
import vllm.model_executor.layers.utils as vllm_layer_utils
from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap


def _keep_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


vllm_layer_utils.dispatch_cpu_unquantized_gemm = _keep_weight


class GlooGroup:
    """PyNcclCommunicator's `broadcast`, the call OpenRLHF's sync makes on both ends, over a gloo group."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.group = stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend="gloo")

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        self.group.broadcast(tensor, src).wait()


def stateless_init_process_group(master_address, master_port, rank, world_size, device) -> GlooGroup:
    """In place of `openrlhf.utils.distributed_util.stateless_init_process_group` on the policy side."""
    return GlooGroup(master_address, master_port, rank, world_size)


class GlooWorkerWrap(WorkerWrap):
    """OpenRLHF's vLLM worker extension with the sync's transport over gloo (its NCCL branch replaced)."""

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend, use_ray):
        rank = torch.distributed.get_rank() + rank_offset
        self._model_update_group = GlooGroup(master_address, master_port, rank, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        assert dtype == self.model_config.dtype, f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
        weight = torch.empty(shape, dtype=dtype)  # WorkerWrap's: device="cuda"
        self._model_update_group.broadcast(weight, src=0)
        self.model_runner.model.load_weights(weights=[(name, weight)])
