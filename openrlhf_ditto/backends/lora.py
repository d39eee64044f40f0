"""LoRA adapters of many runs on one resident base model, each row of a batch through its own run's adapters.

`Adapters` holds fp32 A [r, in] and B [out, r] per adapter name (a run has two: "<run>/sft", its frozen pi_0 once
the warm start is over, and "<run>/ditto") for every adapted Linear (transformers Conv1D) layer, and a forward hook
on each that adds, for each segment of rows, x + s B_1 A_1 x + s B_2 A_2 x of that segment's adapters, in peft's
order of additions: one run's whole batch gets peft's numbers bit for bit, and a row's result never depends on the
other rows (a segmented matmul: one pair of matmuls per adapter and segment). `route` sets the segments for the
forwards inside it, and for their recomputation in the backward under gradient checkpointing.
Adapters are saved in peft's format (adapter_config.json, adapter_model.safetensors), which peft and vLLM load.
"""

import contextlib
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks): an adapter's rank must not exceed it
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's --max-loras: adapters in one batch, each a slot of GPU memory reserved at start (the others wait their turn)
VLLM_MAX_LORAS = 8


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds adapters of `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def _is_target(name: str, targets) -> bool:
    """peft's rule: a regex matches the whole module name; a list entry its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class Adapters:
    def __init__(self, model: torch.nn.Module, rank: int, alpha: int, targets, dropout: float, base: str):
        from transformers.pytorch_utils import Conv1D

        self.rank, self.alpha, self.scale, self.dropout = rank, alpha, alpha / rank, dropout
        self.targets = targets if isinstance(targets, str) else sorted(set(targets))
        self.base = base  # the adapters' base_model_name_or_path
        self.layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D) and _is_target(n, targets)
        }
        self.conv1d = any(
            isinstance(m, Conv1D) for m in self.layers.values()
        )  # weight [in, out]: peft's fan_in_fan_out
        self.weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # adapter -> layer -> (A, B)
        self.segments: list[tuple[slice | None, tuple[str, ...]]] = []
        for name, module in self.layers.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, layer: str):
        def hook(module, inputs, out):
            x, parts = inputs[0], []
            for rows, names in self.segments:
                xs, o = (x, out) if rows is None else (x[rows], out[rows])
                for name in names:
                    A, B = self.weights[name][layer]
                    h = F.dropout(xs, self.dropout, module.training) if self.dropout else xs
                    o = o + (F.linear(F.linear(h.to(A.dtype), A), B) * self.scale).to(o.dtype)
                parts.append(o)
            if not parts:
                return out
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return hook

    @contextlib.contextmanager
    def route(self, segments: list[tuple[int, tuple[str, ...]]]):
        """The forwards inside: the first n_1 rows through adapters names_1, the next n_2 through names_2, ..."""
        saved, start, self.segments = self.segments, 0, []
        for n, names in segments:
            self.segments.append((None if len(segments) == 1 else slice(start, start + n), names))
            start += n
        try:
            yield
        finally:
            self.segments = saved

    def _shape(self, layer: str) -> tuple[int, int]:
        w = self.layers[layer].weight
        return (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])  # (in, out)

    def add(self, name: str) -> None:
        """A fresh adapter, initialised as peft initialises one, draw for draw from torch's RNG: A from the
        nn.Linear(in, r) peft builds, then its kaiming-uniform reset; B zero (after nn.Linear(r, out)'s own draws)."""
        device = next(iter(self.layers.values())).weight.device
        tensors = {}
        for layer in self.layers:
            fan_in, fan_out = self._shape(layer)
            A = torch.empty(self.rank, fan_in)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            torch.nn.init.kaiming_uniform_(torch.empty(fan_out, self.rank), a=math.sqrt(5))
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            tensors[layer] = (A.to(device), torch.zeros(fan_out, self.rank, device=device))
        self.weights[name] = tensors
        self.trainable(name, True)

    def params(self, name: str) -> list[torch.Tensor]:
        return [t for pair in self.weights[name].values() for t in pair]

    def trainable(self, name: str, on: bool) -> None:
        for t in self.params(name):
            t.requires_grad_(on)

    def drop(self, name: str) -> None:
        del self.weights[name]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter as peft names its tensors."""
        out = {}
        for layer, (A, B) in self.weights[name].items():
            out[f"base_model.model.{layer}.lora_A.weight"] = A
            out[f"base_model.model.{layer}.lora_B.weight"] = B
        return out

    def load_state(self, name: str, state: dict[str, torch.Tensor], where) -> None:
        """Take the adapter `name` from peft-named tensors (refused naming `where` if they are another shape)."""
        device = next(iter(self.layers.values())).weight.device
        tensors = {}
        for layer in self.layers:
            fan_in, fan_out = self._shape(layer)
            A, B = (state.get(f"base_model.model.{layer}.lora_{x}.weight") for x in "AB")
            if A is None or B is None or A.shape != (self.rank, fan_in) or B.shape != (fan_out, self.rank):
                raise RuntimeError(f"{where} holds no LoRA adapter of rank {self.rank} for {layer} of this model")
            tensors[layer] = (A.float().to(device), B.float().to(device))
        self.weights[name] = tensors

    def save(self, names: tuple[str, ...], folder: Path) -> None:
        """A peft adapter folder of the base: one adapter, or several as one of their summed rank (A stacked by rows,
        B by columns: B A = B_1 A_1 + B_2 A_2 exactly, at the same scale alpha / r)."""
        from peft import LoraConfig

        k = len(names)
        tensors = {}
        for key in self.state(names[0]):
            parts = [self.state(n)[key] for n in names]
            tensors[key] = torch.cat(parts, dim=0 if ".lora_A." in key else 1).detach().contiguous().cpu()
        config = LoraConfig(
            r=k * self.rank,
            lora_alpha=k * self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            fan_in_fan_out=self.conv1d,
            base_model_name_or_path=self.base,
        )
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        save_file(tensors, folder / "adapter_model.safetensors")

    def load(self, name: str, folder: Path) -> None:
        self.load_state(name, load_file(folder / "adapter_model.safetensors"), folder)

    @torch.no_grad()
    def merged(self, model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The model's state dict with the adapters merged into the adapted weights (W + s B A, one adapter after
        the other in fp32, as peft's merge adds them), in the weights' own dtype."""
        state = dict(model.state_dict())
        for layer, module in self.layers.items():
            w = module.weight.float()
            for name in names:
                A, B = self.weights[name][layer]
                delta = (B @ A) * self.scale
                w = w + (delta.T if self.conv1d else delta)
            state[f"{layer}.weight"] = w.to(module.weight.dtype)
        return state
