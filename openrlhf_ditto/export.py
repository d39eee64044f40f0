"""DITTO's ranked pairs as text records for OpenRLHF's DPO trainer (`python -m openrlhf.cli.train_dpo`).

Pairs are drawn from the run's store by the run's own `PairSampler`, at its newest iteration, in its pair
fractions (restricted to --kinds): demos beat every policy sample, later policies beat earlier ones. One JSON line
per pair:
    {"prompt": ..., "chosen": ..., "rejected": ..., "kind": "online", "chosen_iteration": -1, "rejected_iteration": 3}
(iteration -1 is a demo, -2 an external pair's response). "prompt" is the prompt exactly as the run rendered it
(its chat template or input template already applied) and "chosen"/"rejected" the response tokens decoded with
special tokens kept, so a finished response ends with its end token's text. train_dpo reads the file with
`--data.prompt_key prompt`, without `--data.apply_chat_template`, and with `--data.max_len` the run's plus what it
appends, and tokenizes prompt + response back to the run's own token ids, except where it appends an EOS.
Re-rendering chat messages instead would not round-trip: the run stores token ids, not messages, and templates
rewrite contents.
"""

import contextlib
import json
import os
from collections import Counter
from pathlib import Path

from openrlhf_ditto.pairs import KINDS, PairSampler
from openrlhf_ditto.runfolder import read_run_config
from openrlhf_ditto.store import SampleStore


def export_pairs(
    run: str | os.PathLike,
    out: str | os.PathLike,
    num: int | None = None,
    kinds: list[str] | None = None,
    seed: int = 42,
    overwrite: bool = False,
) -> tuple[Counter, int, int]:
    """Write `num` drawn pairs of `kinds` (default: as many as the run trained on, of every kind) to `out`
    (JSONL; an existing file only with `overwrite`, never inside a run folder). Returns the count per kind, how
    many of the written responses train_dpo will train on other tokens than the run's, and the --data.max_len to
    give train_dpo."""
    from transformers import AutoTokenizer

    run, out = Path(run), Path(out)
    if not (run / "run_config.json").exists() or not (run / "store" / "demos.json").exists():
        raise FileNotFoundError(
            f"{run} holds no DITTO run with stored samples (run_config.json, store/); give the --ckpt.output_dir "
            "of `openrlhf-ditto train`"
        )
    config = read_run_config(run)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the JSONL file to write, e.g. {out / 'pairs.jsonl'}")
    inside = next((p for p in out.absolute().parents if (p / "run_config.json").is_file()), None)
    if inside is not None:  # train --overwrite deletes the folder, and its files are the run's
        raise ValueError(f"--out {out} lies in the DITTO run folder {inside}; write the pairs outside any run folder")
    inputs = [config["data"]["dataset"], config["ditto"].get("extra_pairs")]
    if out.exists() and any(path and Path(path).exists() and out.samefile(path) for path in inputs):
        raise ValueError(f"--out {out} is the run's own --data.dataset or --ditto.extra_pairs; choose another --out")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    store = SampleStore.load(run / "store")
    if store.num_iterations == 0:
        raise ValueError(f"{run} has no sampled iteration yet, so no pairs; let its first iteration finish")
    kinds = list(kinds or KINDS)
    shares = [share if kind in kinds else 0.0 for kind, share in zip(KINDS, config["ditto"]["pair_fractions"])]
    if sum(shares) == 0:
        raise ValueError(
            f"the run drew no pairs of kinds {kinds} (its --ditto.pair_fractions are "
            f"{config['ditto']['pair_fractions']} for {list(KINDS)}); choose other --kinds"
        )
    if num is None:
        num = config["ditto"]["iterations"] * config["ditto"]["resample_every"] * config["train"]["batch_size"]
    sampler = PairSampler(store, tuple(s / sum(shares) for s in shares), seed=seed)
    # at iteration 0 every pair is online: the sampler gives the other shares to online pairs
    pairs = [p for p in sampler.sample(num) if KINDS[p.kind] in kinds]
    if not pairs:
        raise ValueError(
            f"no pairs of kinds {kinds}: {run} holds {store.num_iterations} iteration(s) of samples, and a run with "
            "one iteration has online pairs only"
        )

    tokenizer = AutoTokenizer.from_pretrained(run / "reference")

    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    records = [
        {
            "prompt": text(store.prompt_of(p.chosen)),
            "chosen": text(p.chosen.ids),
            "rejected": text(p.rejected.ids),
            "kind": KINDS[p.kind],
            "chosen_iteration": p.chosen.iteration,
            "rejected_iteration": p.rejected.iteration,
        }
        for p in pairs
    ]
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ValueError(f"cannot write --out {out} ({e})") from None

    # What train_dpo's RewardDataset makes of each row (openrlhf/datasets/reward_dataset.py): prompt + response,
    # trailing newlines stripped, " " + EOS appended unless the text ends with EOS, tokenized, cut to --data.max_len,
    # the last token set to EOS. A truncated sample, a turn that ends with another token than the EOS (Llama-3's
    # <|eot_id|>, Gemma's <end_of_turn>) and a sample cut inside a character reach DPO as other tokens: count them.
    eos = tokenizer.eos_token
    max_len = config["data"]["max_len"] + len(tokenizer(" " + eos, add_special_tokens=False)["input_ids"])
    texts = [(r["prompt"] + r[side]).rstrip("\n") for r in records for side in ("chosen", "rejected")]
    texts = [text if text.endswith(eos) else text + " " + eos for text in texts]
    retokenized = tokenizer(texts, add_special_tokens=False, max_length=max_len, truncation=True)["input_ids"]
    ids = [store.prompt_of(x).tolist() + x.ids.tolist() for p in pairs for x in (p.chosen, p.rejected)]
    changed = sum(a[:-1] + [tokenizer.eos_token_id] != b for a, b in zip(retokenized, ids))
    return Counter(r["kind"] for r in records), changed, max_len
