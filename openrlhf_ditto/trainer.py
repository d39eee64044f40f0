"""The DITTO controller loop (Algorithm 1 of the paper), the same for every execution backend.

    SFT warm start on the demos -> pi_0, frozen as the reference
    for t = 0 .. iterations-1:
        sample M responses per demo prompt from pi_t           (backend.generate)
        score them once with the reference, store them as D_t  (DittoExperienceMaker.make_experience)
        resample_every optimiser steps on ranked pair batches  (backend.train_step)
        checkpoint
    save the final policy as a Hugging Face folder

Run folder (--ckpt.output_dir): reference/ (pi_0), store/ (demos and samples, append-only),
checkpoints/iter_XXXXX/ (written atomically; `latest` names the newest), final/ (the model), logs/ (TensorBoard),
inputs.json (the demos' fingerprints: --resume refuses changed demos), .lock (held by the process that trains it).
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch
from tqdm.auto import tqdm

from openrlhf_ditto.demos import load_demos, load_preference_pairs
from openrlhf_ditto.experience import DittoExperienceMaker
from openrlhf_ditto.models import check_causal_lm, check_lora_targets, eos_token_ids
from openrlhf_ditto.pairs import PairBatch, PairSampler, SequenceBatch, collate
from openrlhf_ditto.store import SampleStore, read_json
from openrlhf_ditto.validation import SELECT, held_out_signal


class Backend(Protocol):
    """What the loop asks of an execution backend (local torch, or OpenRLHF's Ray roles)."""

    def sft_step(self, batch: SequenceBatch) -> float:
        """One SFT optimiser step on the demos (mean NLL of the response tokens); returns the loss."""

    def freeze_reference(self, save_to: Path | None) -> None:
        """Make the current policy pi_0 the frozen reference and set up the DITTO optimiser. With `save_to`,
        also write pi_0 there as a Hugging Face folder, from which a resumed run starts."""

    def generate(self, prompts: list[torch.Tensor], n: int) -> list[list[list[int]]]:
        """n sampled responses (token ids, EOS included when reached) for each prompt, from the current policy."""

    def reference_logps(self, batches: list[SequenceBatch]) -> torch.Tensor:
        """Per-row sums of the frozen reference's log-probs over the response tokens, for all rows of the
        micro-batches in order (one call per scoring, so a distributed reference can run them in parallel)."""

    def policy_logps(self, batches: list[SequenceBatch]) -> torch.Tensor:
        """The same for the current policy, without gradients (the held-out signal, `validation.py`)."""

    def train_step(self, batch: PairBatch) -> dict[str, float]:
        """One optimiser step of DittoActorLoss on the batch (in micro-batches, `PairBatch.split`, accumulating
        gradients); returns the loss metrics of the whole batch, with lr and grad_norm."""

    def save_checkpoint(self, folder: Path) -> None: ...

    def load_checkpoint(self, folder: Path) -> None: ...

    def save_model(self, folder: Path) -> None:
        """Write the policy as a Hugging Face folder (LoRA: merged weights, plus the adapter in adapter/)."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it holds another run, or cannot be written)."""


class RunStopped(RuntimeError):
    """The run stopped before its end (interrupted, a non-finite value, a failed write); the message says where it
    stands and how to continue. `exit_code` is the CLI's: 130 for Ctrl-C, 143 for SIGTERM, else 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _atomic_dir(target: Path):
    """Yield a temporary sibling folder to fill, then rename it onto `target`: an interrupted or failed write leaves
    no half-written folder under the real name (and no temporary one either)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    "ditto.extra_pairs",
    "ditto.val_demos",
)


def run_config(args: SimpleNamespace) -> dict:
    """Every flag of the run as a nested dict (`run_config.json`): resume checks it, and the tools that read a run
    folder (eval, serve-reward, export-pairs) take the run's beta and prompt rendering from it."""

    def plain(x):
        if isinstance(x, SimpleNamespace):
            return {k: plain(v) for k, v in vars(x).items()}
        return list(x) if isinstance(x, tuple) else str(x) if isinstance(x, Path) else x

    return plain(args)


def lock_holder(folder: Path) -> str | None:
    """Who trains the run folder `folder` now (the process that holds its .lock), or None. The kernel drops a
    flock when its process dies, so a killed run never leaves a stale lock."""
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return lock.read_text().strip() or "another process"
    finally:
        os.close(fd)


def check_not_live(run: Path) -> None:
    """Refuse to read a run folder (or a many-users job's users/<id>) while a live process trains it."""
    for folder in (run, run.parent.parent) if run.parent.name == "users" else (run,):
        if holder := lock_holder(folder):
            raise RunFolderError(
                f"{folder} is being trained by {holder}: its final/ and checkpoints may change under this command; "
                "wait for the run to end (or stop it), or give a copy of the folder"
            )


def read_run_config(run: Path) -> dict:
    """The run_config.json of the run folder `run`, refused naming the file if it is broken or if a live process
    is training the run (eval, serve-reward and export-pairs read it first)."""
    check_not_live(run)
    file = run / "run_config.json"
    config = read_json(file)
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("actor", "data", "ditto")):
        raise ValueError(f"{file} is not the run_config.json of a DITTO run (its flags): it was changed after the run")
    return config


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


def check_run_folder(args: SimpleNamespace) -> Path | None:
    """Refuse a run folder that holds another run or other files, touching nothing; returns the checkpoint to
    resume from (or None)."""
    out = Path(args.ckpt.output_dir)
    config_file = out / "run_config.json"
    if holder := lock_holder(out):
        raise RunFolderError(
            f"{out} is in use by {holder}: two processes writing one run folder would mix their runs; wait for it "
            "to end (or stop it), or choose another --ckpt.output_dir"
        )
    for flag, folder in (("--ckpt.output_dir", out), ("--logger.tensorboard_dir", args.logger.tensorboard_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise RunFolderError(f"{flag} {folder} is a file; give a folder")
    if config_file.exists():
        if not args.resume and not args.overwrite:
            raise RunFolderError(
                f"{out} already holds a DITTO run; pass --resume to continue it or --overwrite to delete it and "
                "start again (or choose another --ckpt.output_dir)"
            )
        if args.resume and (saved := _identity(read_run_config(out))) != _identity(run_config(args)):
            raise RunFolderError(
                f"{out} holds a run with other settings ({saved}); --resume needs the same "
                f"{', '.join('--' + key for key in RUN_IDENTITY)} (or use --overwrite to start again)"
            )
        inputs = [
            ("--actor.model_name_or_path", args.actor.model_name_or_path),
            ("--data.dataset", args.data.dataset),
            ("--ditto.extra_pairs", args.ditto.extra_pairs),
        ]
        for flag, path in inputs:
            if args.overwrite and path and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
                raise RunFolderError(
                    f"--overwrite would delete {flag} {path}, which lies in --ckpt.output_dir {out}; copy it out "
                    "first, or choose another --ckpt.output_dir"
                )
    # --overwrite deletes a DITTO run, never a folder of other files (a .lock alone is a start that claimed nothing)
    elif out.exists() and any(f.name != ".lock" for f in out.iterdir()):
        raise RunFolderError(f"{out} is not empty and holds no DITTO run; choose an empty --ckpt.output_dir")
    elif args.resume:
        print(f"{out} holds no run to resume: starting a new one")
    latest = out / "checkpoints" / "latest"
    return out / "checkpoints" / latest.read_text().strip() if args.resume and latest.exists() else None


def claim_run_folder(args: SimpleNamespace, inputs: dict | None = None):
    """Make --ckpt.output_dir this run's (--overwrite deletes what it held), only once everything checked out, and
    hold its lock: returns the open lock file, which the caller closes when the run ends. `inputs`
    (`input_fingerprints`) is written to inputs.json for --resume to compare."""
    out, tensorboard = Path(args.ckpt.output_dir), args.logger.tensorboard_dir
    try:  # first: a folder it cannot write stops the start before the run folder is touched
        if tensorboard:
            Path(tensorboard).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot write --logger.tensorboard_dir {tensorboard}: {e}") from None
    try:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process claimed it since check_run_folder
            lock.close()
            raise RunFolderError(
                f"{out} is in use by {lock_holder(out)}; wait for it to end, or choose another --ckpt.output_dir"
            ) from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} ({' '.join(sys.argv) or 'python'})")
        lock.flush()
        (out / "run_config.json").write_text(json.dumps(run_config(args), indent=1))
        if inputs is not None:
            (out / "inputs.json").write_text(json.dumps(inputs))
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder --ckpt.output_dir {out}: {e}") from None
    return lock


def input_fingerprints(store: SampleStore) -> dict[str, list[str]]:
    """A short hash per demo and per external pair, as tokenized (so a changed template counts as a change)."""

    def digest(*ids: torch.Tensor) -> str:
        return hashlib.sha256(json.dumps([x.tolist() for x in ids]).encode()).hexdigest()[:16]

    return {
        "demos": [digest(store.prompt_of(d), d.ids) for d in store.demos],
        "extra_pairs": [digest(store.prompt_of(c), c.ids, r.ids) for c, r in store.external],
    }


def check_inputs_unchanged(args: SimpleNamespace, inputs: dict[str, list[str]]) -> None:
    """--resume continues on the data the run started with: refuse it, naming the records, when they changed."""
    file = Path(args.ckpt.output_dir) / "inputs.json"
    if not (args.resume and file.exists()):
        return
    saved = read_json(file)
    for key, flag in (("demos", "--data.dataset"), ("extra_pairs", "--ditto.extra_pairs")):
        old, new = saved.get(key, []), inputs[key]
        changed = [str(i) for i, (a, b) in enumerate(zip(old, new)) if a != b]
        what = [f"records {', '.join(changed[:10])} changed"] if changed else []
        what += [f"{len(new) - len(old)} added"] if len(new) > len(old) else []
        what += [f"{len(old) - len(new)} removed"] if len(new) < len(old) else []
        if what:
            raise RunFolderError(
                f"{flag} changed since this run started ({'; '.join(what)}, counted from 0 in file order): --resume "
                "continues on the data the run started with. Train on the new data in a new run (another "
                "--ckpt.output_dir, or --overwrite), or with many users (--data.users) in a new round"
            )


def _rendering(args: SimpleNamespace) -> dict:
    return dict(
        input_template=args.data.input_template,
        apply_chat_template=args.data.apply_chat_template,
        prompt_max_len=args.data.max_len - args.rollout.max_new_tokens,
        generate_max_len=args.rollout.max_new_tokens,
    )


def demos_and_store(args: SimpleNamespace, tokenizer) -> SampleStore:
    """Load and check every demo and external pair; say once how many are cut to the response budget. The last
    --ditto.val_demos demos are held out: they never enter the store (`held_out_demos` reads them)."""
    rendering = _rendering(args)
    demos = load_demos(
        args.data.dataset, tokenizer, input_key=args.data.input_key, output_key=args.data.output_key, **rendering
    )
    if args.ditto.val_demos:
        if args.ditto.val_demos >= len(demos):
            raise ValueError(
                f"--ditto.val_demos {args.ditto.val_demos} holds out every demo of --data.dataset {args.data.dataset} "
                f"({len(demos)}); hold out fewer, or give your held-out examples with --ditto.val_dataset"
            )
        demos = demos[: -args.ditto.val_demos]
    store = SampleStore.from_demos(
        [d.prompt_ids for d in demos], [d.response_ids for d in demos], [d.truncated for d in demos]
    )
    responses = {"demos": demos}
    if args.ditto.extra_pairs:
        d = args.data
        pairs = load_preference_pairs(
            args.ditto.extra_pairs, tokenizer, d.prompt_key, d.chosen_key, d.rejected_key, **rendering
        )
        store.add_external(pairs)
        responses["external pair responses"] = [r for pair in pairs for r in pair]
    for name, group in responses.items():
        cut = [d for d in group if d.truncated]
        if cut:
            longest = max(len(tokenizer(d.response, add_special_tokens=False)["input_ids"]) + 1 for d in cut)
            print(
                f"warning: {len(cut)} of {len(group)} {name} are longer than --rollout.max_new_tokens "
                f"{args.rollout.max_new_tokens} (the longest is {longest} tokens with its EOS) and are cut to it; "
                "raise --rollout.max_new_tokens (and --data.max_len) to train on them whole",
                file=sys.stderr,
            )
    return store


def held_out_demos(args: SimpleNamespace, tokenizer) -> list:
    """The demos of the held-out signal: the last --ditto.val_demos of --data.dataset, or --ditto.val_dataset's."""
    d = args.data
    if args.ditto.val_dataset:
        return load_demos(args.ditto.val_dataset, tokenizer, d.input_key, d.output_key, **_rendering(args))
    if args.ditto.val_demos:
        return load_demos(d.dataset, tokenizer, d.input_key, d.output_key, **_rendering(args))[-args.ditto.val_demos :]
    return []


def stop_if_not_finite(values: dict[str, float], where: str, causes: str) -> None:
    """Raise RunStopped at the first NaN or inf among `values`: training on it would only spread it."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunStopped(f"{where}: {name} is {value}. Likely causes: {causes}")


def sft_warm_start(backend: Backend, store: SampleStore, args: SimpleNamespace, logger: Logger, pad: int) -> None:
    """Supervised steps on all demos at once, stopping early once the loss is below --ditto.sft_stop_loss."""
    batch = collate([store.prompts[d.prompt] for d in store.demos], [d.ids for d in store.demos], pad)
    bar = tqdm(range(args.ditto.sft_steps), desc="SFT warm start")
    for step in bar:
        loss = backend.sft_step(batch)
        logger.scalars("sft", {"loss": loss}, step)
        stop_if_not_finite(
            {"the SFT loss": loss},
            f"SFT step {step + 1}",
            f"a learning rate too high (--ditto.sft_lr {args.ditto.sft_lr}) or an overflow in half precision",
        )
        bar.set_postfix(loss=f"{loss:.3f}")
        if loss < args.ditto.sft_stop_loss:
            break
    bar.close()


def say_how_final_compares(history: list[dict], args: SimpleNamespace) -> None:
    """The end of a run says what the held-out signal says of final/ against pi_0, or that nothing checked it."""
    rows = {int(row["iteration"]): row for row in history if row["prefix"] == "val"}
    if not rows:
        print(
            "note: no demo was held out, so nothing checked that DITTO beat its SFT warm start (reference/); "
            "--ditto.val_demos 1 measures it during the run, `openrlhf-ditto eval` after it"
        )
        return
    final, pi_0 = rows[args.ditto.iterations][SELECT], rows.get(0, {}).get(SELECT, 0.0)
    k = args.ditto.val_demos
    val = args.ditto.val_dataset or f"the last {k} demo{'s' * (k > 1)} of --data.dataset (held out of training)"
    if final < pi_0:
        # measured on real authors (README, "Does DITTO beat SFT?"): a warning to check, not a verdict
        print(
            f"warning: on {val}, DITTO's own reward ranks final/ below its SFT warm start: held-out {SELECT} "
            f"{final:+.3f} < pi_0's {pi_0:+.3f}. On our real-author benchmark it fell like this at every iteration, "
            "also where the style judge preferred DITTO: compare final/ with reference/ (pi_0) using "
            "`openrlhf-ditto eval` before you use it",
            file=sys.stderr,
        )
    else:
        print(f"held-out check: final/ {SELECT} {final:+.3f}, pi_0's {pi_0:+.3f}, on {val}")


def resume_hint(out: Path) -> str:
    """Where a stopped run stands and how to continue it."""
    latest = out / "checkpoints" / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        return (
            f"the last complete checkpoint is {out / 'checkpoints' / name}; continue from it with the same command "
            "plus --resume"
        )
    if (out / "reference").exists():
        return f"no DITTO checkpoint yet; --resume starts DITTO again from pi_0 ({out / 'reference'}), SFT kept"
    return "nothing was trained yet; --resume (or --overwrite) starts again from the SFT warm start"


@contextlib.contextmanager
def writing(what: str, out: Path):
    """A failed write (disk full, read-only folder) stops the run; the files written before it stay intact.
    torch.save reports a full disk as a RuntimeError of its zip writer, not an OSError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise RunStopped(f"could not write {what} ({e}); free some space or make {out} writable") from None


def load_tokenizer(args: SimpleNamespace):
    """--actor.model_name_or_path's tokenizer, once the folder is known to hold a causal LM (with the LoRA target
    modules when --ds.lora.rank > 0), or an error that says what to give."""
    from transformers import AutoTokenizer

    model = Path(args.actor.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        run = f" (a DITTO run folder: its model is {model / 'final'})" if (model / "run_config.json").exists() else ""
        raise FileNotFoundError(
            f"cannot load a tokenizer from --actor.model_name_or_path {model}{run} ({str(e).splitlines()[0]}); "
            "give a local Hugging Face model folder (config.json, weights, tokenizer files)"
        ) from e
    check_causal_lm(model, "--actor.model_name_or_path")
    if args.ds.lora.rank > 0:
        check_lora_targets(model, args.ds.lora.target_modules)
    return tokenizer


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def train(args: SimpleNamespace, make_backend) -> Path:
    """Run DITTO end to end; `make_backend(model_path)` builds the backend. Returns the final model folder.

    The tokenizer, every demo and the model are checked before the run folder is claimed. Ctrl-C or SIGTERM, a
    NaN or inf loss, log-prob or gradient norm, and a failed write each stop the run with RunStopped, whose message
    says where the run stands; every file is written atomically, so --resume continues from the last checkpoint.
    """
    resume_from = check_run_folder(args)
    out = Path(args.ckpt.output_dir)
    tokenizer = load_tokenizer(args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    store = demos_and_store(args, tokenizer)
    inputs = input_fingerprints(store)
    check_inputs_unchanged(args, inputs)
    reference = out / "reference"
    from_reference = args.resume and reference.exists()  # pi_0 of the run being continued: no SFT again
    torch.manual_seed(args.train.seed)  # the SFT adapter's initialisation
    backend = make_backend(reference if from_reference else args.actor.model_name_or_path)
    lock = claim_run_folder(args, inputs)

    logger = Logger(args, out / "logs")
    state = {"iteration": 0, "global_step": 0}
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if resume_from is not None:
            state = read_json(resume_from / "trainer_state.json")
            store = SampleStore.load(out / "store", num_iterations=state["iteration"])
        if not from_reference:
            sft_warm_start(backend, store, args, logger, pad)
        torch.manual_seed(args.train.seed)  # the fresh adapter is the same whether or not SFT ran in this process
        if from_reference:
            backend.freeze_reference(None)
        else:
            with writing(f"pi_0 to {reference}", out), _atomic_dir(reference) as tmp:
                backend.freeze_reference(tmp)

        sampler = PairSampler(store, tuple(args.ditto.pair_fractions), seed=args.train.seed)
        eos = eos_token_ids(args.actor.model_name_or_path, tokenizer)
        maker = DittoExperienceMaker(store, sampler, backend.reference_logps, pad, eos, args.rollout.micro_batch_size)
        maker.score_inputs()
        reference_causes = "broken reference weights, or an overflow in half precision (bf16/fp16)"
        for i, demo in enumerate(store.demos):
            stop_if_not_finite({"its reference log-prob": demo.ref_logp}, f"demo {i}", reference_causes)
        with writing(f"the demos to {out / 'store'}", out):
            store.save(out / "store")
        val = held_out_demos(args, tokenizer)
        val_prompts = [torch.tensor(v.prompt_ids) for v in val]
        val_ids = [torch.tensor(v.response_ids) for v in val]

        def validate(t: int, n: int) -> None:
            """Log the held-out signal of pi_t (`validation.py`); n samples per prompt, 0 for pi_0."""
            d = args.ditto
            mb = args.rollout.micro_batch_size
            signal = held_out_signal(backend, val_prompts, val_ids, n, d.beta, pad, mb, args.train.seed + t)
            logger.scalars("val", {"iteration": t, **signal}, state["global_step"])

        if val and resume_from is None:
            validate(0, 0)
        if resume_from is not None:
            backend.load_checkpoint(resume_from / "backend")
            rng = torch.load(resume_from / "rng.pt", weights_only=False)
            sampler.load_state_dict(rng["sampler"])
            torch.set_rng_state(rng["torch"])
            logger.history = read_json(resume_from / "metrics.jsonl", lines=True)
            print(f"resumed from {resume_from} (iteration {state['iteration']}, step {state['global_step']})")
        else:
            torch.manual_seed(args.train.seed)

        train_causes = (
            f"a learning rate too high (--actor.adam.lr {args.actor.adam.lr}), an overflow in half precision "
            "(bf16/fp16), or a --ditto.beta far from the paper's 0.05"
        )
        for t in range(state["iteration"], args.ditto.iterations):
            rollouts = backend.generate(store.prompts, args.rollout.n_samples_per_prompt)
            stats = maker.make_experience(rollouts)
            stop_if_not_finite(stats, f"iteration {t + 1}, sampling", reference_causes)
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
                stop_if_not_finite(metrics, f"step {state['global_step']} (iteration {t + 1})", train_causes)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc']:.2f}")
            bar.close()
            # |log pi - log pi_ref| after one update (step 2) and at iteration 1's end: an update that survives the
            # dtype's rounding grows with every step, rounding noise stays where it was (README, bf16: does the
            # update survive?)
            shifts = [m["logratio_abs"] for m in logger.history if m["prefix"] == "train"]
            if t == 0 and resume_from is None and len(shifts) >= 3 and shifts[-1] < 2 * shifts[1]:
                print(
                    f"warning: after iteration 1 the policy's log-probs differ from the reference's by "
                    f"{shifts[-1]:.2g} nats a sequence, about as much as after one step ({shifts[1]:.2g}): the "
                    f"update is lost to rounding; raise --actor.adam.lr (now {args.actor.adam.lr:g}; README, bf16: "
                    "does the update survive?)",
                    file=sys.stderr,
                )
            if val:
                validate(t + 1, args.rollout.n_samples_per_prompt)

            state["iteration"] = t + 1
            name = f"iter_{t + 1:05d}"
            with writing(f"checkpoint {out / 'checkpoints' / name}", out):
                store.save(out / "store")
                with _atomic_dir(out / "checkpoints" / name) as tmp:
                    backend.save_checkpoint(tmp / "backend")
                    torch.save({"sampler": sampler.state_dict(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
                    (tmp / "trainer_state.json").write_text(json.dumps(state))
                    (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logger.history))
                latest_tmp = out / "checkpoints" / "latest.tmp"
                latest_tmp.write_text(name)
                os.replace(latest_tmp, out / "checkpoints" / "latest")
            for old in sorted((out / "checkpoints").glob("iter_?????"))[: -args.ckpt.max_num]:
                shutil.rmtree(old)

        final = out / "final"
        with writing(f"the final model to {final}", out):
            with _atomic_dir(final) as tmp:
                backend.save_model(tmp)
                tokenizer.save_pretrained(tmp)
            (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logger.history))
        say_how_final_compares(logger.history, args)
        return final
    except (KeyboardInterrupt, RunStopped) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        steps = args.ditto.iterations * args.ditto.resample_every
        where = f"after DITTO step {state['global_step']} of {steps}"
        reason = f"stopped by {e.args[0] if e.args else 'Ctrl-C'} {where}" if interrupted else str(e)
        logger.history.append({"prefix": "stopped", "step": state["global_step"], "reason": reason})
        with contextlib.suppress(OSError):  # a full disk may refuse this too; the message below still tells
            (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logger.history))
        code = (143 if e.args == ("SIGTERM",) else 130) if interrupted else 1
        raise RunStopped(f"{reason}. Nothing after the last checkpoint was kept: {resume_hint(out)}", code) from None
    finally:
        logger.close()
        lock.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
