"""load_demos: file formats, prompt rendering, tokenization, truncation, and an error message for each bad input."""

import copy
import csv
import json
import re

import pytest
from transformers import AutoTokenizer

from openrlhf_ditto.demos import load_demos

RECORDS = [
    {"prompt": "Beautiful is better than ugly.", "response": "Explicit is better than implicit."},
    {"prompt": "Simple is better than complex.", "response": "Complex is better than complicated."},
    {"prompt": "Flat is better than nested.", "response": "Sparse is better than dense. Readability counts."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(folder, fmt: str, records: list[dict]):
    """Write `records` as a file (or a `datasets` folder) of format `fmt`; return its path."""
    if fmt == "jsonl":
        path = folder / "demos.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path = folder / "demos.json"
        path.write_text(json.dumps(records))
    elif fmt == "csv":
        path = folder / "demos.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        import pandas as pd

        path = folder / "demos.parquet"
        pd.DataFrame(records).to_parquet(path)
    elif fmt in ("save_to_disk", "save_to_disk_dict"):
        import datasets

        path = folder / fmt
        data = datasets.Dataset.from_list(records)
        if fmt == "save_to_disk_dict":
            data = datasets.DatasetDict({"train": data})
        data.save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "save_to_disk", "save_to_disk_dict"])
def test_every_format_loads_and_tokenizes(tokenizer, tmp_path, fmt):
    demos = load_demos(write(tmp_path, fmt, RECORDS), tokenizer)
    assert len(demos) == len(RECORDS)
    for demo, record in zip(demos, RECORDS):
        assert demo.prompt == record["prompt"]  # no template: the prompt as it is
        assert demo.response == record["response"]
        assert demo.prompt_ids == ids(tokenizer, record["prompt"])
        assert demo.response_ids == ids(tokenizer, record["response"]) + [tokenizer.eos_token_id]
        assert demo.response_ids[-1] == tokenizer.eos_token_id
        assert demo.truncated is False


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_folder_reads_every_file_or_refuses_what_it_would_drop(tokenizer, tmp_path, capsys):
    """`datasets.load_dataset(folder)` kept the most common format and read subfolders: a.jsonl plus sub/c.jsonl
    (duplicates), b.csv and notes.txt dropped without a word."""
    folder = tmp_path / "demos"
    jsonl(folder / "a.jsonl", RECORDS)
    jsonl(folder / "sub" / "c.jsonl", RECORDS)
    write(folder, "csv", RECORDS)
    (folder / "notes.txt").write_text("to do")
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ValueError) as e:
        load_demos(folder, tokenizer)
    assert str(e.value) == (
        f"demos: the folder {folder} holds notes.txt, sub/, which are not read (a folder is its own .json, .jsonl, "
        ".csv, .parquet files, no subfolder); move them out, or give one file"
    )
    (folder / "notes.txt").unlink()
    (folder / "sub" / "c.jsonl").rename(tmp_path / "c.jsonl")
    (folder / "sub").rmdir()
    with pytest.raises(ValueError) as e:
        load_demos(folder, tokenizer)
    assert f"demos: the folder {folder} mixes formats (JSON: a.jsonl; CSV: demos.csv); keep one format" in str(e.value)
    (folder / "demos.csv").unlink()
    write(folder, "json", RECORDS[:2])
    capsys.readouterr()
    assert [d.response for d in load_demos(folder, tokenizer)] == [r["response"] for r in RECORDS + RECORDS[:2]]
    assert capsys.readouterr().err == f"demos: {folder}, a folder: 5 records from 2 files (a.jsonl 3, demos.json 2)\n"
    jsonl(folder / "test.jsonl", RECORDS)  # as datasets names a split
    with pytest.raises(ValueError) as e:
        load_demos(folder, tokenizer)
    assert f"the folder {folder} holds test.jsonl, named as held-out data: every file of a folder is read" in str(
        e.value
    )


def test_a_folder_of_one_user_per_file_asks_whether_data_users_was_meant(tiny_model_path, tmp_path, capsys):
    from openrlhf_ditto.cli.main import main
    from openrlhf_ditto.demos import users_hint

    folder = tmp_path / "users"
    jsonl(folder / "alice.jsonl", RECORDS[:2])
    jsonl(folder / "bob.jsonl", RECORDS[2:])
    note = (
        f"note: the 2 files of --data.dataset {folder} share no prompt, as one user each would: they train one model "
        "on all their demos; for a model per user (each file's stem its id) add --data.users"
    )
    assert users_hint(folder) == note
    argv = ["train", "--actor.model_name_or_path", str(tmp_path / "no-model"), "--data.dataset", str(folder)]
    with pytest.raises(SystemExit):
        main(argv)
    assert note in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--data.users"])
    assert "note:" not in capsys.readouterr().err
    jsonl(folder / "bob.jsonl", RECORDS[1:])  # a prompt in both: one dataset in parts
    assert users_hint(folder) is None


def test_other_keys(tokenizer, tmp_path):
    records = [{"question": r["prompt"], "answer": r["response"], "extra": 1} for r in RECORDS]
    demos = load_demos(write(tmp_path, "jsonl", records), tokenizer, input_key="question", output_key="answer")
    assert [d.prompt for d in demos] == [r["prompt"] for r in RECORDS]
    assert [d.response for d in demos] == [r["response"] for r in RECORDS]


def test_input_template(tokenizer, tmp_path):
    template = "User: {}\nAssistant: "
    demos = load_demos(write(tmp_path, "jsonl", RECORDS), tokenizer, input_template=template)
    for demo, record in zip(demos, RECORDS):
        assert demo.prompt == f"User: {record['prompt']}\nAssistant: "
        assert demo.prompt_ids == ids(tokenizer, demo.prompt)


def test_apply_chat_template(tokenizer, tmp_path):
    demos = load_demos(write(tmp_path, "jsonl", RECORDS), tokenizer, apply_chat_template=True)
    for demo, record in zip(demos, RECORDS):
        assert demo.prompt == f"<|im_start|>user\n{record['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        assert demo.prompt.endswith("<|im_start|>assistant\n")
        assert demo.prompt_ids == ids(tokenizer, demo.prompt)
        assert demo.response_ids == ids(tokenizer, record["response"]) + [tokenizer.eos_token_id]


def test_chat_records_use_the_last_assistant_message(tokenizer, tmp_path):
    conversation = [
        {"role": "system", "content": "Be Pythonic."},
        {"role": "user", "content": "Errors should never pass silently."},
        {"role": "assistant", "content": "Unless explicitly silenced."},
        {"role": "user", "content": "In the face of ambiguity?"},
        {"role": "assistant", "content": "Refuse the temptation to guess."},
    ]
    trailing_user = conversation[:3] + [{"role": "user", "content": "Thanks."}]
    demos = load_demos(write(tmp_path, "jsonl", [{"messages": conversation}, {"messages": trailing_user}]), tokenizer)
    first, second = demos
    assert first.response == "Refuse the temptation to guess."
    assert first.prompt == tokenizer.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    assert first.prompt.startswith("<|im_start|>system\nBe Pythonic.<|im_end|>\n")
    assert first.prompt.endswith("In the face of ambiguity?<|im_end|>\n<|im_start|>assistant\n")
    assert first.prompt_ids == ids(tokenizer, first.prompt)
    assert first.response_ids == ids(tokenizer, first.response) + [tokenizer.eos_token_id]
    assert second.response == "Unless explicitly silenced."
    assert second.prompt.endswith("Errors should never pass silently.<|im_end|>\n<|im_start|>assistant\n")


def test_long_response_is_truncated_and_flagged(tokenizer, tmp_path):
    record = {"prompt": "Now is better than never.", "response": "Although never is often better than right now. " * 4}
    full = ids(tokenizer, record["response"]) + [tokenizer.eos_token_id]
    path = write(tmp_path, "jsonl", [record])
    (demo,) = load_demos(path, tokenizer, generate_max_len=10)
    assert demo.truncated is True
    assert demo.response_ids == full[:10] and tokenizer.eos_token_id not in demo.response_ids
    (demo,) = load_demos(path, tokenizer, generate_max_len=len(full))  # fits exactly, EOS included
    assert demo.truncated is False and demo.response_ids == full
    (demo,) = load_demos(path, tokenizer, generate_max_len=len(full) - 1)  # only the EOS is cut
    assert demo.truncated is True and demo.response_ids == full[:-1]


def test_prompt_of_exactly_prompt_max_len_is_accepted(tokenizer, tmp_path):
    n = len(ids(tokenizer, RECORDS[0]["prompt"]))
    (demo,) = load_demos(write(tmp_path, "jsonl", RECORDS[:1]), tokenizer, prompt_max_len=n)
    assert len(demo.prompt_ids) == n


# ------------------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist; give a JSON, JSONL, Parquet or CSV"):
        load_demos(tmp_path / "nope.jsonl", tokenizer)


@pytest.mark.parametrize("name", ["demos.jsonl", "demos.json", "demos.csv", "demos.parquet"])
def test_empty_file(tokenizer, tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{name} is empty; it needs at least one record")):
        load_demos(tmp_path / name, tokenizer)


@pytest.mark.parametrize(
    "name, content", [("demos.json", "[]"), ("demos.jsonl", "\n\n"), ("demos.csv", "prompt,response\n")]
)
def test_file_without_records(tokenizer, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{name} holds no records; it needs at least one record")):
        load_demos(tmp_path / name, tokenizer)


def test_unknown_extension(tokenizer, tmp_path):
    (tmp_path / "demos.txt").write_text("prompt\tresponse\n")
    with pytest.raises(ValueError, match=r"demos\.txt has an unknown extension; use one of \.json, \.jsonl"):
        load_demos(tmp_path / "demos.txt", tokenizer)


def test_missing_key_lists_the_keys_and_the_flags(tokenizer, tmp_path):
    path = write(tmp_path, "jsonl", [{"prompt": "Hi", "text": "Hello"}])
    with pytest.raises(ValueError, match=r"record 0: no key 'response'; its keys are \['prompt', 'text'\]") as info:
        load_demos(path, tokenizer)
    assert "--data.input_key / --data.output_key" in str(info.value)
    with pytest.raises(ValueError, match=r"no key 'question', 'answer'; its keys are \['prompt', 'text'\]"):
        load_demos(path, tokenizer, input_key="question", output_key="answer")


@pytest.mark.parametrize("response, shown", [("", "''"), ("  \n", r"'  \\n'"), (None, "None")])
def test_empty_response(tokenizer, tmp_path, response, shown):
    path = write(tmp_path, "jsonl", [RECORDS[0], {"prompt": "Hi", "response": response}])
    with pytest.raises(ValueError, match=rf"record 1: the response is {shown}; it must be non-empty text"):
        load_demos(path, tokenizer)


def test_non_string_response(tokenizer, tmp_path):  # CSV fields are always text: "42" is a fine response there
    path = write(tmp_path, "jsonl", [{"prompt": "Hi", "response": 42}])
    with pytest.raises(ValueError, match=r"record 0: the response is 42; it must be non-empty text"):
        load_demos(path, tokenizer)


def test_non_string_prompt(tokenizer, tmp_path):
    path = write(tmp_path, "jsonl", [{"prompt": 7, "response": "Seven."}])
    with pytest.raises(ValueError, match=r"record 0: the prompt is 7; it must be text"):
        load_demos(path, tokenizer)


def test_prompt_over_prompt_max_len(tokenizer, tmp_path):
    short = {"prompt": "Hi", "response": "Hello"}
    long = {"prompt": " ".join(r["prompt"] for r in RECORDS), "response": "Hello"}
    n_short, n_long = len(ids(tokenizer, short["prompt"])), len(ids(tokenizer, long["prompt"]))
    path = write(tmp_path, "jsonl", [short, long])
    with pytest.raises(
        ValueError, match=rf"record 1: the prompt alone is {n_long} tokens, over the prompt budget of {n_short} "
    ):
        load_demos(path, tokenizer, prompt_max_len=n_short)
    # the chat template's tokens count: a prompt that fits as plain text may not fit once rendered
    message = [{"role": "user", "content": short["prompt"]}]
    chat = len(ids(tokenizer, tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)))
    path = write(tmp_path, "jsonl", [short])
    assert load_demos(path, tokenizer, prompt_max_len=n_short)
    with pytest.raises(ValueError, match=rf"record 0: the prompt alone is {chat} tokens.*raise --data.max_len"):
        load_demos(path, tokenizer, prompt_max_len=n_short, apply_chat_template=True)


@pytest.mark.parametrize("records", [RECORDS, [{"messages": [{"role": "assistant", "content": "Hi"}]}]])
def test_chat_template_missing(tokenizer, tmp_path, records):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    path = write(tmp_path, "jsonl", records)
    with pytest.raises(
        ValueError, match=r"the tokenizer has no chat template; use a chat model, give --data.input_template"
    ):
        load_demos(path, plain, apply_chat_template="messages" not in records[0])


def test_chat_record_without_assistant_message(tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    with pytest.raises(ValueError, match=r"record 1: 'messages' has no assistant message to use as the demo"):
        load_demos(write(tmp_path, "jsonl", [good, bad]), tokenizer)


def test_tokenizer_without_eos(tokenizer, tmp_path):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=r"the tokenizer has no eos_token"):
        load_demos(write(tmp_path, "jsonl", RECORDS), no_eos)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "demos.jsonl",
            '{"prompt": "a", "response": "b"}\n\n{"prompt": "a" "response": "b"}\n',
            r"line 3: not valid JSON",
        ),
        ("demos.jsonl", '{"prompt": "a", "response": "b"}\n"just text"\n', r"line 2: expected a JSON object"),
        (
            "demos.json",
            '[{"prompt": "a", "response": "b"},\n {"prompt": "a", "response": }]',
            r"line 2 column 30: not valid JSON \(Expecting value\)",
        ),
        ("demos.csv", "prompt,response\na,b\nc,d,e\n", r"line 3: 3 fields where the header has 2; quote fields"),
        ("demos.csv", "prompt,response\na,b\nc\n", r"line 3: 1 fields where the header has 2"),
        ("demos.csv", 'prompt,response\na,"b\n', r"not valid CSV"),
        ("demos.parquet", "PAR1 not really", r"demos\.parquet is not a readable Parquet file \(Arrow"),
        ("demos.jsonl", b'{"prompt": "caf\xe9", "response": "b"}\n', r"is not UTF-8 text \(byte 15: invalid"),
    ],
)
def test_broken_file_is_one_line_naming_file_and_line(tokenizer, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=expected) as info:
        load_demos(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"demos: {path}") and "\n" not in message, message


def test_byte_order_mark_is_not_part_of_the_data(tokenizer, tmp_path):
    for name, text in [
        ("demos.csv", "prompt,response\nHi,Hello\n"),
        ("demos.jsonl", '{"prompt": "Hi", "response": "Hello"}'),
    ]:
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        (demo,) = load_demos(tmp_path / name, tokenizer)
        assert (demo.prompt, demo.response) == ("Hi", "Hello")
