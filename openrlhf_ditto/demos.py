"""Demonstrations: load them with Hugging Face `datasets` and tokenize them as OpenRLHF does.

A demo is a prompt and the response the user wants. Prompts are rendered with the tokenizer's chat template
(``apply_chat_template``, generation prompt added) or with ``input_template`` (``"User: {}\\nAssistant: "``), or
used as they are. A chat record (``messages``) uses its last assistant message as the demo and the messages before
it as the prompt. Response token ids end with the tokenizer's EOS, as a sample that finished does.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Demo:
    prompt: str  # the rendered prompt text, as the model sees it
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool  # the response was cut to the response budget (and lost its EOS)


def _read_records(path: Path) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    if not path.exists():
        raise FileNotFoundError(f"demos: {path} does not exist; give a JSON, JSONL, Parquet or CSV file or a folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path), split="train")
    else:
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"demos: {path} has an unknown extension; use one of {', '.join(_FORMATS)} or a folder")
        if path.stat().st_size == 0:
            raise ValueError(f"demos: {path} is empty; it needs at least one record with a prompt and a response")
        try:
            data = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except ValueError as e:  # `[]`, a CSV header alone, blank lines: datasets finds no split at all
            if "corresponds to no data" not in str(e):
                raise
            data = []
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if len(data) == 0:
        raise ValueError(f"demos: {path} holds no records; it needs at least one record with a prompt and a response")
    return list(data)


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
    records = _read_records(path)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("demos: the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) before training")
    if (apply_chat_template or "messages" in records[0]) and not tokenizer.chat_template:
        raise ValueError(
            "demos: the tokenizer has no chat template; use a chat model, give --input_template instead of "
            "--apply_chat_template, or write prompts as plain text"
        )
    demos = []
    for i, record in enumerate(records):
        where = f"demos: {path}, record {i}"
        if "messages" in record and input_key not in record:
            messages = record["messages"]
            last = max((j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise ValueError(f"{where}: 'messages' has no assistant message to use as the demo")
            prompt_messages, response = messages[:last], messages[last]["content"]
        else:
            missing = [k for k in (input_key, output_key) if k not in record]
            if missing:
                raise ValueError(
                    f"{where}: no key {', '.join(map(repr, missing))}; its keys are {sorted(record)}. "
                    "Name the right ones with --input_key / --output_key (or give chat records with 'messages')"
                )
            prompt_messages, response = [{"role": "user", "content": record[input_key]}], record[output_key]
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"{where}: the response is {response!r}; every demo needs a non-empty text response")

        if apply_chat_template or "messages" in record:
            prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = prompt_messages[-1]["content"]
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: the prompt is {prompt!r}; it must be text")
            if input_template:
                prompt = input_template.format(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > prompt_max_len:
            raise ValueError(
                f"{where}: the prompt alone is {len(prompt_ids)} tokens, over --prompt_max_len {prompt_max_len}; "
                "raise --prompt_max_len or shorten the prompt"
            )
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        truncated = len(response_ids) > generate_max_len
        demos.append(Demo(prompt, response, prompt_ids, response_ids[:generate_max_len], truncated))
    return demos
