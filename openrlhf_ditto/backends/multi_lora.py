"""Many users on one resident base model (`openrlhf-ditto train --data.users`): the local backend with a pair of LoRA
adapters per user on one copy of the base weights.

A user's pi_0 is the base plus their SFT adapter (frozen after the warm start: their reference); their DITTO policy
is the base plus that adapter plus their DITTO adapter, stacked (peft sums the active adapters' outputs). A single-user
run merges the SFT adapter into the base instead, which a shared base cannot do; the two differ only in the order of
float additions (see README, "Many users"). `use(uid)` makes a user current: every LocalBackend method then acts on
that user's adapters, optimiser and lr schedule. Each user has an optimiser and schedule of their own: one schedule
for all would warm up N times too fast, and an optimiser that keeps zero gradients for idle weights (DeepSpeed's
does) moves them through its moments.

Rollouts: our sampler, one user at a time (a user's rows share their adapters); or one vLLM engine with LoRA enabled
and every user's policy as one adapter (`combined_adapter`), all users in one `generate` call, each adapter reloaded
from a few MB on disk after its user's update.
"""

import copy
import itertools
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import SequenceBatch

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks): an adapter's rank must not exceed it
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's --max-loras: adapters in one batch, each a slot of GPU memory reserved at start (the others wait their turn)
VLLM_MAX_LORAS = 8


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds adapters of `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def vllm_serve_command(base: str, adapters: dict[str, Path], rank: int) -> list[str]:
    """`vllm serve` of the base model with each user's DITTO policy (`final/`, rank 2 x `rank`) as a LoRA adapter
    named by their id."""
    return [
        "vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(2 * rank)),
        "--max-loras", str(min(len(adapters), VLLM_MAX_LORAS)),
        "--lora-modules", *(f"{uid}={path}" for uid, path in adapters.items()),
    ]  # fmt: skip


def _sft(uid: str) -> str:
    return f"sft_{uid}"


def _ditto(uid: str) -> str:
    return f"ditto_{uid}"


class MultiLoraBackend(LocalBackend):
    def __init__(self, model_path, args):
        super().__init__(model_path, args)
        self.adapter_config = copy.deepcopy(self.model.peft_config["default"])
        self.adapter_config.base_model_name_or_path = str(Path(model_path).resolve())
        self.model.delete_adapter("default")  # LocalBackend's own adapter: here each user has theirs
        self.optimizers: dict[str, tuple] = {}  # uid -> (DITTO optimiser, its lr schedule)
        self.current: str | None = None
        self.lora_ids = itertools.count(1)  # vLLM caches an adapter by its id: a new id loads the new weights
        self.loaded: dict[str, int] = {}  # uid -> the id of the user's adapter in the vLLM engine
        self.sync_dir = None  # the adapters vLLM loads, rewritten after each update

    def add_user(self, uid: str, reference: Path | None) -> None:
        """Give `uid` their SFT adapter: pi_0 from their `reference/` folder, or a fresh one to warm-start (its
        initialisation draws from torch's RNG, as a single-user run's does)."""
        if reference is None:
            self.model.add_adapter(_sft(uid), self.adapter_config)
        else:
            self.model.load_adapter(str(reference), adapter_name=_sft(uid))
        self.use(uid)

    def use(self, uid: str) -> None:
        """Make `uid` the current user: their adapters active, only the one in training trainable."""
        self.current = uid
        ditto = _ditto(uid) in self.model.peft_config
        names = [_sft(uid), _ditto(uid)] if ditto else [_sft(uid)]
        self.model.base_model.set_adapter(names)  # trainable: the active adapters
        self.model.active_adapter = names[0]  # peft's wrapper looks up one adapter's config (all are LoRA)
        if ditto:
            self.model.set_requires_grad(_sft(uid), False)  # pi_0 is frozen
        self.optimizer, self.scheduler = self.optimizers.get(uid, (None, None))

    def drop_user(self, uid: str) -> None:
        """Free a finished user's adapters, optimiser state and adapter in the vLLM engine."""
        self.model.base_model.set_adapter([])  # peft warns when an active adapter is deleted
        for name in (_sft(uid), _ditto(uid)):
            self.model.delete_adapter(name)
        del self.optimizers[uid]
        if uid in self.loaded:
            self.vllm.llm.llm_engine.remove_lora(self.loaded.pop(uid))
        self.current = self.optimizer = self.scheduler = None

    def freeze_reference(self, save_to: Path | None) -> None:
        """The current user's SFT adapter becomes their frozen pi_0 (saved to `save_to` as an adapter of the base),
        and a fresh DITTO adapter, with its own optimiser, is stacked on it."""
        uid = self.current
        if save_to is not None:
            self._save_adapter(save_to, get_peft_model_state_dict(self.model, adapter_name=_sft(uid)), 1)
            self._save_tokenizer(save_to)
        self.model.add_adapter(_ditto(uid), self.adapter_config)
        self.sft_optimizer = self.sft_scheduler = None
        self.use(uid)
        self._ditto_optimizer()
        self.optimizers[uid] = (self.optimizer, self.scheduler)

    def start_from(self, folder: Path) -> None:
        """Start the current user's DITTO adapter from a checkpoint's weights (`save_checkpoint`), with the fresh
        optimiser it has: a new round of a user whose demos grew."""
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["trainable"], strict=False)

    @torch.no_grad()
    def reference_logps(self, batches: list[SequenceBatch]) -> torch.Tensor:
        """The current user's pi_0: the base and their SFT adapter."""
        self.model.eval()
        self.model.base_model.set_adapter([_sft(self.current)], inference_mode=True)
        try:
            return torch.cat([sequence_logps(self.model, b.to(self.device)).float().cpu() for b in batches])
        finally:
            self.use(self.current)

    def save_model(self, folder: Path) -> None:
        """The current user's DITTO policy as one LoRA adapter of the base (`combined_adapter`), with the tokenizer:
        what `vllm serve --lora-modules`, `eval` and `serve-reward` load."""
        self._save_adapter(folder, self.combined_adapter(self.current), 2)
        self._save_tokenizer(folder)

    def combined_adapter(self, uid: str) -> dict[str, torch.Tensor]:
        """The user's SFT and DITTO adapters as one adapter of twice the rank, A = [A_sft; A_ditto] and
        B = [B_sft, B_ditto]: B A = B_sft A_sft + B_ditto A_ditto exactly, at the same scale alpha / r (both adapters
        have the run's rank and alpha; the combined one is saved with 2r and 2 alpha). vLLM applies one adapter per
        request, so this is how it samples and serves a user's policy."""
        sft = get_peft_model_state_dict(self.model, adapter_name=_sft(uid))
        ditto = get_peft_model_state_dict(self.model, adapter_name=_ditto(uid))
        return {k: torch.cat([sft[k], ditto[k]], dim=0 if "lora_A" in k else 1) for k in sft}

    def _save_adapter(self, folder: Path, tensors: dict[str, torch.Tensor], times: int) -> None:
        """A peft adapter folder of the base, of `times` the run's rank and alpha."""
        config = copy.deepcopy(self.adapter_config)
        config.r, config.lora_alpha = times * config.r, times * config.lora_alpha
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / "adapter_model.safetensors")

    def _save_tokenizer(self, folder: Path) -> None:
        """Beside an adapter that users load as a model (eval, serve-reward): the tokenizer and the base's
        generation config (its stop tokens)."""
        self.tokenizer.save_pretrained(folder)
        self.model.get_base_model().generation_config.save_pretrained(folder)

    def generate_users(
        self, prompts: dict[str, list[torch.Tensor]], n: int, rng: Callable[[str], AbstractContextManager]
    ) -> dict[str, list[list[list[int]]]]:
        """n responses per prompt of each user, from their current policy; `rng(uid)` holds the user's own torch RNG,
        so each user draws what a single-user run of them draws."""
        r = self.args.rollout
        if r.engine == "torch":  # one user at a time: a batch runs one set of adapters
            out = {}
            for uid, user_prompts in prompts.items():
                with rng(uid):
                    self.use(uid)
                    out[uid] = self.generate(user_prompts, n)
            return out
        from vllm.lora.request import LoRARequest

        from openrlhf_ditto.backends.vllm_engine import VLLMEngine

        if self.vllm is None:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
            v = self.args.vllm
            share = v.gpu_memory_utilization or (0.3 if cuda else 0.1)
            rank = vllm_max_lora_rank(2 * self.adapter_config.r)
            at_once = min(len(prompts), VLLM_MAX_LORAS)
            self.vllm = VLLMEngine(
                self.model_path,
                self.args.data.max_len,
                self.args.train.seed,
                share,
                v.enable_sleep,
                rank,
                at_once,
                dtype=self.dtype,
            )
            self.sync_dir = tempfile.TemporaryDirectory(prefix="ditto-adapters-")
        rows, requests, seeds = [], [], []
        for uid, user_prompts in prompts.items():
            if uid in self.loaded:  # its weights changed since: the engine drops the old ones
                self.vllm.llm.llm_engine.remove_lora(self.loaded[uid])
            self.loaded[uid] = lora_id = next(self.lora_ids)
            path = Path(self.sync_dir.name) / f"{uid}-{lora_id}"
            self._save_adapter(path, self.combined_adapter(uid), 2)
            with rng(uid):
                seeds += torch.randint(2**31, (len(user_prompts),)).tolist()  # as VLLMEngine draws them
            rows += [uid] * len(user_prompts)
            # a name of its own too: vLLM's prefix cache tells adapters apart by name
            requests += [LoRARequest(f"{uid}-{lora_id}", lora_id, str(path))] * len(user_prompts)
        groups = self.vllm.generate(
            [p for user_prompts in prompts.values() for p in user_prompts],
            n,
            self.eos_ids,
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            r.top_k,
            seeds=seeds,
            lora_requests=requests,
        )
        out = {uid: [] for uid in prompts}
        for uid, group in zip(rows, groups):
            out[uid].append(group)
        return out
