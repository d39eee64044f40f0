"""The DITTO controller loop (Algorithm 1 of the paper), the same for every execution backend.

    SFT warm start on the demos -> pi_0, frozen as the reference
    for t = 0 .. iterations-1:
        sample M responses per demo prompt from pi_t           (backend.generate)
        score them once with the reference, store them as D_t  (DittoExperienceMaker.make_experience)
        resample_every optimiser steps on ranked pair batches  (backend.train_step)
        checkpoint
    save the final policy as a Hugging Face folder

Run folder (--ckpt.output_dir): reference/ (pi_0), store/ (demos and samples, append-only),
checkpoints/iter_XXXXX/ (written atomically; `latest` names the newest), final/ (the model), logs/ (TensorBoard).
"""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch
from tqdm.auto import tqdm

from openrlhf_ditto.demos import load_demos
from openrlhf_ditto.experience import DittoExperienceMaker
from openrlhf_ditto.models import eos_token_ids
from openrlhf_ditto.pairs import PairBatch, PairSampler, SequenceBatch, collate
from openrlhf_ditto.store import SampleStore


class Backend(Protocol):
    """What the loop asks of an execution backend (local torch, or OpenRLHF's Ray roles)."""

    def sft_step(self, batch: SequenceBatch) -> float:
        """One SFT optimiser step on the demos (mean NLL of the response tokens); returns the loss."""

    def freeze_reference(self, save_to: Path | None) -> None:
        """Make the current policy pi_0 the frozen reference and set up the DITTO optimiser. With `save_to`,
        also write pi_0 there as a Hugging Face folder, from which a resumed run starts."""

    def generate(self, prompts: list[torch.Tensor], n: int) -> list[list[list[int]]]:
        """n sampled responses (token ids, EOS included when reached) for each prompt, from the current policy."""

    def reference_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-row sum of the frozen reference's log-probs over the response tokens."""

    def train_step(self, batch: PairBatch) -> dict[str, float]:
        """One optimiser step of DittoActorLoss on the batch (in micro-batches, `PairBatch.split`, accumulating
        gradients); returns the loss metrics of the whole batch, with lr and grad_norm."""

    def save_checkpoint(self, folder: Path) -> None: ...

    def load_checkpoint(self, folder: Path) -> None: ...

    def save_model(self, folder: Path) -> None:
        """Write the policy as a Hugging Face folder (LoRA: merged weights, plus the adapter in adapter/)."""


class RunFolderError(RuntimeError):
    pass


def _atomic_dir(target: Path):
    """A temporary sibling folder to fill, then `os.replace` onto `target`: a crash leaves no half checkpoint."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# The settings that define a run: --resume refuses a folder whose run had others, so samples never mix.
RUN_IDENTITY = (
    "actor.model_name_or_path",
    "data.dataset",
    "train.seed",
    "rollout.n_samples_per_prompt",
    "ds.lora.rank",
    "ditto.sft_steps",
)


def run_config(args: SimpleNamespace) -> dict:
    """Every flag of the run as a nested dict (`run_config.json`): resume checks it, and the tools that read a run
    folder (eval, serve-reward, export-pairs) take the run's beta and prompt rendering from it."""

    def plain(x):
        if isinstance(x, SimpleNamespace):
            return {k: plain(v) for k, v in vars(x).items()}
        return list(x) if isinstance(x, tuple) else str(x) if isinstance(x, Path) else x

    return plain(args)


def _identity(config: dict) -> dict:
    def get(key):
        node = config
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        return node

    return {key: get(key) for key in RUN_IDENTITY}


class Logger:
    """TensorBoard scalars (always) and W&B (when --logger.wandb.key is given)."""

    def __init__(self, args: SimpleNamespace, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(args.logger.tensorboard_dir or log_dir))
        self.wandb = None
        if args.logger.wandb.key:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("--logger.wandb.key needs W&B's client: pip install wandb") from e

            wandb.login(key=args.logger.wandb.key)
            self.wandb = wandb.init(
                project=args.logger.wandb.project, name=args.logger.wandb.run_name, config=vars(args), resume="allow"
            )
        self.history: list[dict] = []  # every logged row, for the report

    def scalars(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        self.history.append({"prefix": prefix, "step": step, **metrics})

    def text(self, tag: str, text: str, step: int) -> None:
        self.tb.add_text(tag, text, step)
        if self.wandb:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb:
            self.wandb.finish()


def prepare_run_folder(args: SimpleNamespace) -> Path | None:
    """Check the run folder; returns the checkpoint to resume from (or None for a fresh start)."""
    out = Path(args.ckpt.output_dir)
    config_file = out / "run_config.json"
    if config_file.exists():
        if args.overwrite:
            shutil.rmtree(out)
        elif not args.resume:
            raise RunFolderError(
                f"{out} already holds a DITTO run; pass --resume to continue it or --overwrite to delete it and "
                "start again (or choose another --ckpt.output_dir)"
            )
        elif (saved := _identity(json.loads(config_file.read_text()))) != _identity(run_config(args)):
            raise RunFolderError(
                f"{out} holds a run with other settings ({saved}); --resume needs the same "
                f"{', '.join('--' + key for key in RUN_IDENTITY)} (or use --overwrite to start again)"
            )
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RunFolderError(f"{out} is not empty and holds no DITTO run; choose an empty --ckpt.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(run_config(args), indent=1))
    latest = out / "checkpoints" / "latest"
    return out / "checkpoints" / latest.read_text().strip() if args.resume and latest.exists() else None


def demos_and_store(args: SimpleNamespace, tokenizer) -> SampleStore:
    demos = load_demos(
        args.data.dataset,
        tokenizer,
        input_key=args.data.input_key,
        output_key=args.data.output_key,
        input_template=args.data.input_template,
        apply_chat_template=args.data.apply_chat_template,
        prompt_max_len=args.data.max_len - args.rollout.max_new_tokens,
        generate_max_len=args.rollout.max_new_tokens,
    )
    return SampleStore.from_demos(
        [d.prompt_ids for d in demos], [d.response_ids for d in demos], [d.truncated for d in demos]
    )


def sft_warm_start(backend: Backend, store: SampleStore, args: SimpleNamespace, logger: Logger, pad: int) -> None:
    """Supervised steps on all demos at once, stopping early once the loss is below --ditto.sft_stop_loss."""
    batch = collate([store.prompts[d.prompt] for d in store.demos], [d.ids for d in store.demos], pad)
    bar = tqdm(range(args.ditto.sft_steps), desc="SFT warm start")
    for step in bar:
        loss = backend.sft_step(batch)
        logger.scalars("sft", {"loss": loss}, step)
        bar.set_postfix(loss=f"{loss:.3f}")
        if loss < args.ditto.sft_stop_loss:
            break
    bar.close()


def train(args: SimpleNamespace, make_backend) -> Path:
    """Run DITTO end to end; `make_backend(model_path)` builds the backend. Returns the final model folder."""
    from transformers import AutoTokenizer

    resume_from = prepare_run_folder(args)
    out = Path(args.ckpt.output_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.actor.model_name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load a tokenizer from --actor.model_name_or_path {args.actor.model_name_or_path} ({e}); "
            "give a local Hugging Face model folder (config.json, weights, tokenizer files)"
        ) from e
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    store = demos_and_store(args, tokenizer)
    logger = Logger(args, out / "logs")
    state = {"iteration": 0, "global_step": 0}
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        store = SampleStore.load(out / "store", num_iterations=state["iteration"])

    reference = out / "reference"
    torch.manual_seed(args.train.seed)  # the SFT adapter's initialisation
    backend = make_backend(reference if reference.exists() else args.actor.model_name_or_path)
    if not reference.exists():
        sft_warm_start(backend, store, args, logger, pad)
    torch.manual_seed(args.train.seed)  # the fresh adapter is the same whether or not SFT ran in this process
    tmp = None if reference.exists() else _atomic_dir(reference)
    backend.freeze_reference(tmp)
    if tmp is not None:
        _commit_dir(tmp, reference)

    sampler = PairSampler(store, tuple(args.ditto.pair_fractions), seed=args.train.seed)
    eos = eos_token_ids(args.actor.model_name_or_path, tokenizer)
    maker = DittoExperienceMaker(store, sampler, backend.reference_logps, pad, eos, args.rollout.micro_batch_size)
    maker.score_demos()
    store.save(out / "store")
    if resume_from is not None:
        backend.load_checkpoint(resume_from / "backend")
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        sampler.load_state_dict(rng["sampler"])
        torch.set_rng_state(rng["torch"])
        logger.history = [json.loads(line) for line in (resume_from / "metrics.jsonl").read_text().splitlines()]
        print(f"resumed from {resume_from} (iteration {state['iteration']}, step {state['global_step']})")
    else:
        torch.manual_seed(args.train.seed)

    for t in range(state["iteration"], args.ditto.iterations):
        rollouts = backend.generate(store.prompts, args.rollout.n_samples_per_prompt)
        stats = maker.make_experience(rollouts)
        logger.scalars("samples", stats, state["global_step"])
        first = store.iterations[t][0][0]
        logger.text("samples/example", tokenizer.decode(first.ids, skip_special_tokens=True), t)

        bar = tqdm(range(args.ditto.resample_every), desc=f"DITTO iteration {t + 1}/{args.ditto.iterations}")
        for _ in bar:
            batch = maker.pair_batch(args.train.batch_size)
            metrics = backend.train_step(batch)
            metrics["truncated_rate"] = batch.truncated.float().mean().item()
            state["global_step"] += 1
            logger.scalars("train", metrics, state["global_step"])
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc']:.2f}")
        bar.close()

        state["iteration"] = t + 1
        store.save(out / "store")
        name = f"iter_{t + 1:05d}"
        tmp = _atomic_dir(out / "checkpoints" / name)
        backend.save_checkpoint(tmp / "backend")
        torch.save({"sampler": sampler.state_dict(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logger.history))
        _commit_dir(tmp, out / "checkpoints" / name)
        latest_tmp = out / "checkpoints" / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, out / "checkpoints" / "latest")
        for old in sorted((out / "checkpoints").glob("iter_?????"))[: -args.ckpt.max_num]:
            shutil.rmtree(old)

    final = out / "final"
    tmp = _atomic_dir(final)
    backend.save_model(tmp)
    tokenizer.save_pretrained(tmp)
    _commit_dir(tmp, final)
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logger.history))
    logger.close()
    return final
