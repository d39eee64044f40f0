"""Demonstrations, and external preference pairs: read them (JSON, JSONL, CSV, Parquet or a `datasets` folder) and
tokenize them as OpenRLHF does.

A demo is a prompt and the response the user wants. Prompts are rendered with the tokenizer's chat template
(``apply_chat_template``, generation prompt added) or with ``input_template`` (``"User: {}\\nAssistant: "``), or
used as they are. A chat record (``messages``) uses its last assistant message as the demo and the messages before
it as the prompt. Response token ids end as a finished sample does: with the token the chat template ends an
assistant turn with (`turns.end_of_turn`: <|eot_id|> for Llama-3, <end_of_turn> for Gemma, ...), or with the
tokenizer's EOS where no chat template renders the prompt.
"""

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from openrlhf_ditto.turns import end_of_turn


@dataclass
class Demo:
    prompt: str  # the rendered prompt text, as the model sees it
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool  # the response was cut to the response budget (and lost its end token)


def read_records(path: str | os.PathLike, what: str = "demos") -> list[dict]:
    """The records of a JSON / JSONL / CSV / Parquet file or a `datasets` folder. Each problem is one line naming
    `what` (the flag or role of the file), the file, and the line or record at fault."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist; give a JSON, JSONL, Parquet or CSV file or a folder")
    if path.is_dir():
        records = [record for rows in read_folder(path, what).values() for record in rows]
    else:
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv", ".parquet"):
            raise ValueError(
                f"{what}: {path} has an unknown extension; use one of .json, .jsonl, .csv, .parquet or a folder"
            )
        if path.stat().st_size == 0:
            raise ValueError(f"{what}: {path} is empty; it needs at least one record")
        if suffix == ".parquet":
            import pyarrow.parquet

            try:
                records = pyarrow.parquet.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
                raise ValueError(f"{what}: {path} is not a readable Parquet file ({_one_line(e)})") from None
        else:
            try:
                records = _read_csv(path, what) if suffix == ".csv" else _read_json(path, what)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{what}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
                ) from None
    if not records:
        raise ValueError(f"{what}: {path} holds no records; it needs at least one record")
    return records


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0]}"


def _read_json(path: Path, what: str) -> list[dict]:
    """A JSON array of objects, or JSON Lines (one object a line, blank lines skipped), whatever the extension."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not JSON
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        lines = [None] * len(records)
    else:
        records, lines = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{what}: {path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                        "hold one JSON object"
                    ) from None
                lines.append(n)
    for i, (record, n) in enumerate(zip(records, lines)):
        if not isinstance(record, dict):
            where = f"line {n}" if n else f"record {i}"
            raise ValueError(f"{what}: {path}, {where}: expected a JSON object with named fields, got {record!r:.60}")
    return records


def _read_csv(path: Path, what: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(f, strict=True)
        records = []
        try:
            for row in reader:
                if None in row or None in row.values():  # DictReader's marks of a row longer / shorter than the header
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                    raise ValueError(
                        f"{what}: {path}, line {reader.line_num}: {fields} fields where the header has "
                        f"{len(reader.fieldnames)}; quote fields that hold commas or line breaks"
                    )
                records.append(row)
        except csv.Error as e:
            raise ValueError(f"{what}: {path}, near line {reader.line_num}: not valid CSV ({e})") from None
    return records


FORMATS = {".json": "JSON", ".jsonl": "JSON", ".csv": "CSV", ".parquet": "Parquet"}  # JSON: an array or JSON Lines
HELD_OUT = re.compile(r"(^|[-_.])(test|eval|evaluation|dev|valid|validation|held[-_]?out)([-_.]|$)", re.IGNORECASE)
_said: set[str] = set()  # the lines `_say_once` printed: a folder is read again by each tokenizer that renders it


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def read_folder(path: str | os.PathLike, what: str = "demos") -> dict[str, list[dict]]:
    """The records of a folder, by file: a `datasets` folder (save_to_disk; its train split), or demo files of one
    format (JSON and JSONL, CSV or Parquet), every one of them read. Subfolders, files of other kinds, several
    formats and files named as held-out splits (test, eval, ...) are refused rather than left out: each would
    otherwise go silently unread, or be trained on. Says once which files a folder contributes."""
    path = Path(path)
    if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        datasets.disable_progress_bars()
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many kinds; the first line says what it found
            raise ValueError(f"{what}: cannot read the dataset folder {path} ({_one_line(e)})") from None
        which = ""
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            which, data = f" of its {split} split (its splits: {', '.join(data)})", data[split]
        _say_once(f"{what}: {path}, a datasets folder: {len(data)} records{which}")
        return {path.name: list(data)}
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))  # not .DS_Store, .gitattributes
    others = [p.name + "/" * p.is_dir() for p in entries if p.is_dir() or p.suffix.lower() not in FORMATS]
    if others:
        raise ValueError(
            f"{what}: the folder {path} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which "
            f"{'is' if len(others) == 1 else 'are'} not read (a folder is its own {', '.join(FORMATS)} files, no "
            "subfolder); move them out, or give one file"
        )
    if not entries:
        raise ValueError(f"{what}: the folder {path} is empty; give demo files ({', '.join(FORMATS)}) or one file")
    formats = {}
    for p in entries:
        formats.setdefault(FORMATS[p.suffix.lower()], []).append(p.name)
    if len(formats) > 1:
        kinds = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in formats.items())
        raise ValueError(
            f"{what}: the folder {path} mixes formats ({kinds}); keep one format in it (one may be a copy of "
            "another), or give one file"
        )
    split = [p.name for p in entries if HELD_OUT.search(p.stem)]
    if split and len(entries) > 1:
        raise ValueError(
            f"{what}: the folder {path} holds {', '.join(split)}, named as held-out data: every file of a folder "
            "is read; give the training file alone (and held-out examples to `openrlhf-ditto eval` or "
            "--ditto.val_dataset)"
        )
    files = {p.name: read_records(p, what) for p in entries}
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in files.items())
    _say_once(f"{what}: {path}, a folder: {sum(map(len, files.values()))} records from {len(files)} files ({counts})")
    return files


def users_hint(path: str | os.PathLike, input_key: str = "prompt") -> str | None:
    """A note when a folder's files look like one user each (several files, no prompt in two of them): as one
    dataset, they train one model on everyone's demos."""
    path = Path(path)
    if not path.is_dir():
        return None
    files = read_folder(path)
    if len(files) < 2:
        return None
    seen: dict[str, str] = {}
    for name, rows in files.items():
        for row in rows:
            prompt = row[input_key] if input_key in row else (row.get("messages") or [])[:-1]
            prompt = json.dumps(prompt, sort_keys=True, default=str)
            if seen.setdefault(prompt, name) != name:
                return None
    return (
        f"note: the {len(files)} files of --data.dataset {path} share no prompt, as one user each would: they train "
        "one model on all their demos; for a model per user (each file's stem its id) add --data.users"
    )


def load_demos(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    input_key: str = "prompt",
    output_key: str = "response",
    input_template: str | None = None,
    apply_chat_template: bool = False,
    prompt_max_len: int = 1024,
    generate_max_len: int = 1024,
) -> list[Demo]:
    """Read and tokenize demonstrations. Errors name the file, the record and the fix."""
    path = Path(path)
    records = read_records(path)
    _check_tokenizer(tokenizer, apply_chat_template or "messages" in records[0], "demos")
    ends = {True: end_of_turn(tokenizer), False: tokenizer.eos_token_id}  # by whether the chat template renders
    demos = []
    for i, record in enumerate(records):
        where = f"demos: {path}, record {i}"
        if "messages" in record and input_key not in record:
            messages = record["messages"]
            last = max((j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise ValueError(f"{where}: 'messages' has no assistant message to use as the demo")
            prompt, response = messages[:last], messages[last]["content"]
        else:
            missing = [k for k in (input_key, output_key) if k not in record]
            if missing:
                raise ValueError(
                    f"{where}: no key {', '.join(map(repr, missing))}; its keys are {sorted(record)}. "
                    "Name the right ones with --data.input_key / --data.output_key (or give chat records with "
                    "'messages')"
                )
            prompt, response = record[input_key], record[output_key]
        chat = apply_chat_template or isinstance(prompt, list)
        demos.append(
            _tokenize(
                tokenizer,
                where,
                prompt,
                response,
                "response",
                chat,
                ends,
                input_template,
                prompt_max_len,
                generate_max_len,
            )
        )
    return demos


def load_preference_pairs(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    prompt_key: str | None = None,
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    input_template: str | None = None,
    apply_chat_template: bool = False,
    prompt_max_len: int = 1024,
    generate_max_len: int = 1024,
) -> list[tuple[Demo, Demo]]:
    """Read and tokenize preference pairs (chosen, rejected) in OpenRLHF train_dpo's layout and with its keys:
    chat records (chosen and rejected are conversations; the prompt is --data.prompt_key's messages, else the
    chosen conversation minus its last message) or text records (the prompt is --data.prompt_key's text, rendered
    as the demos are). Each side is tokenized as a demo is: its prompt, then its response and end token."""
    path, what = Path(path), "--ditto.extra_pairs"
    records = read_records(path, what)
    _check_tokenizer(tokenizer, apply_chat_template or isinstance(records[0].get(chosen_key), list), what)
    ends = {True: end_of_turn(tokenizer), False: tokenizer.eos_token_id}
    keys = "--data.prompt_key / --data.chosen_key / --data.rejected_key"
    pairs = []
    for i, record in enumerate(records):
        where = f"{what}: {path}, record {i}"
        missing = [k for k in (prompt_key, chosen_key, rejected_key) if k is not None and k not in record]
        if missing:
            raise ValueError(
                f"{where}: no key {', '.join(map(repr, missing))}; its keys are {sorted(record)}. Name the right ones "
                f"with {keys}"
            )
        chosen, rejected = record[chosen_key], record[rejected_key]
        if isinstance(chosen, list) and isinstance(rejected, list):  # conversations: the last messages differ
            if prompt_key is None and chosen[:-1] != rejected[:-1]:
                raise ValueError(
                    f"{where}: the chosen and rejected conversations differ before their last message, so they "
                    f"share no prompt; give the prompt apart with {keys}"
                )
            prompt = record[prompt_key] if prompt_key is not None else chosen[:-1]
            chosen, rejected = (
                c[-1].get("content") if c and isinstance(c[-1], dict) else c for c in (chosen, rejected)
            )
        elif prompt_key is None:
            raise ValueError(
                f"{where}: text pairs need their prompt apart (train_dpo would take the whole text as the response); "
                "name its key with --data.prompt_key"
            )
        else:
            prompt = record[prompt_key]
        if chosen == rejected:
            raise ValueError(
                f"{where}: the chosen and rejected responses are the same text; DPO learns nothing from it"
            )
        chat = apply_chat_template or isinstance(prompt, list)
        sides = [(chosen, "chosen response"), (rejected, "rejected response")]
        pairs.append(
            tuple(
                _tokenize(
                    tokenizer, where, prompt, text, name, chat, ends, input_template, prompt_max_len, generate_max_len
                )
                for text, name in sides
            )
        )
    return pairs


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, chat: bool, what: str) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{what}: the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) before training"
        )
    if chat and not tokenizer.chat_template:
        raise ValueError(
            f"{what}: the tokenizer has no chat template; use a chat model, give --data.input_template instead of "
            "--data.apply_chat_template, or write prompts as plain text"
        )


def _tokenize(
    tokenizer, where, prompt, response, name, chat, ends, input_template, prompt_max_len, generate_max_len
) -> Demo:
    """A prompt (text, or chat messages) and its response as a Demo: the prompt rendered (chat template with the
    generation prompt, or --data.input_template) and tokenized, the response tokenized with its end token
    (`ends[chat]`), cut to the budget."""
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"{where}: the {name} is {response!r}; it must be non-empty text")
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: the prompt is {prompt!r}; it must be text")
        if input_template:
            prompt = input_template.format(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:  # the first response token must be predicted from something: BOS, as in pretraining
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"{where}: the prompt is {prompt!r}, no tokens, and the tokenizer has no BOS token to start from; "
                "give a prompt, or render it with --data.apply_chat_template or --data.input_template"
            )
        prompt_ids = [tokenizer.bos_token_id]
    if len(prompt_ids) > prompt_max_len:
        raise ValueError(
            f"{where}: the prompt alone is {len(prompt_ids)} tokens, over the prompt budget of {prompt_max_len} "
            "(--data.max_len minus --rollout.max_new_tokens); raise --data.max_len or shorten the prompt"
        )
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [ends[chat]]
    truncated = len(response_ids) > generate_max_len
    return Demo(prompt, response, prompt_ids, response_ids[:generate_max_len], truncated)
