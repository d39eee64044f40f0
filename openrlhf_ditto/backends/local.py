"""The local backend: policy, frozen reference and rollouts in one process (plain torch + transformers + peft).

fp32 on CPU, bf16 on CUDA. With LoRA (the paper's setting) the SFT adapter is merged into the base weights, which
become the frozen reference, and DITTO trains a fresh adapter: reference log-probs are the same model with the
adapter disabled, so no second copy of the model is held. Full-parameter training keeps a frozen copy.
"""

import copy
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from openrlhf_ditto.backends.sampling import sample_responses
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps
from openrlhf_ditto.models import eos_token_ids, save_pretrained
from openrlhf_ditto.pairs import PairBatch, SequenceBatch


class LocalBackend:
    def __init__(self, model_path: str | Path, args: SimpleNamespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"cannot load a Hugging Face causal LM from {model_path!s} ({e}); give a local model folder "
                "with config.json, weights and tokenizer to --actor.model_name_or_path"
            ) from e
        self.pad = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.model = model.to(self.device)
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
            self.sft_optimizer = torch.optim.AdamW(self._trainable(), lr=d.sft_lr, weight_decay=0.0)
            self.sft_scheduler = get_scheduler(
                d.sft_lr_scheduler,
                self.sft_optimizer,
                num_warmup_steps=math.ceil(d.sft_warmup_ratio * d.sft_steps),
                num_training_steps=d.sft_steps,
            )
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
        opt = self.args.actor
        self.optimizer = torch.optim.AdamW(
            self._trainable(), lr=opt.adam.lr, betas=tuple(opt.adam.betas), weight_decay=opt.adam.weight_decay
        )
        steps = self.args.ditto.iterations * self.args.ditto.resample_every
        self.scheduler = get_scheduler(
            opt.lr_scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(opt.lr_warmup_ratio * steps),
            num_training_steps=steps,
        )

    def generate(self, prompts: list[torch.Tensor], n: int) -> list[list[list[int]]]:
        r = self.args.rollout
        return sample_responses(
            self.model, prompts, n, self.pad, self.eos_ids, r.max_new_tokens, r.temperature, r.top_p
        )

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
        self.model.train()
        B = len(batch.kinds)
        chosen, rejected = [], []
        for mb in batch.split(self.args.train.micro_batch_size):
            mb = mb.to(self.device)
            b = len(mb.kinds)
            logps = sequence_logps(self.model, mb)
            loss, _ = self.loss_fn.on_pairs(logps, mb)
            (loss * b / B).backward()  # gradient accumulation: the mean over the whole batch
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
