"""export-pairs: drawn pairs as text records, read back by OpenRLHF's own DPO dataset with train_dpo's own flags."""

import json
import os
import runpy
import shutil
import sys

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # train_dpo imports openrlhf.models (CPU install)

import pytest  # noqa: E402
import torch  # noqa: E402
from test_trainer import refused  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from openrlhf_ditto.cli.args import hierarchize  # noqa: E402
from openrlhf_ditto.cli.main import build_parser, main  # noqa: E402
from openrlhf_ditto.pairs import KINDS, PairSampler, kind_counts  # noqa: E402
from openrlhf_ditto.runfolder import run_config  # noqa: E402
from openrlhf_ditto.store import DEMO, Response, SampleStore  # noqa: E402

SENTENCES = [
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Complex is better than complicated.",
    "Flat is better than nested.",
    "Sparse is better than dense.",
    "Readability counts.",
    "Errors should never pass silently.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "Now is better than never.",
]


def train_argv(model, *extra) -> list[str]:
    return ["train", "--actor.model_name_or_path", str(model), "--data.dataset", "demos.jsonl",
            "--data.apply_chat_template", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_path, tmp_path_factory):
    """A run folder built directly: run_config.json of a real `train` command line, the tiny model as reference/,
    and a store of 3 iterations whose samples are tokenized sentences, i.e. the tokens their text gives back, as a
    real model's samples almost always are (the tiny random model's own samples are byte soup); one sample per
    iteration is truncated (no EOS)."""
    out = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_model_path, out / "reference")
    args = hierarchize(
        build_parser().parse_args(
            train_argv(
                tiny_model_path, "--ditto.iterations", "3", "--ditto.resample_every", "2", "--train.batch_size", "10"
            )
        )
    )
    (out / "run_config.json").write_text(json.dumps(run_config(args)))
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is better?", "Any advice on errors?")
    ]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def ids(i: int, eos: bool = True) -> list[int]:
        return tok(SENTENCES[i % len(SENTENCES)], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * eos

    store = SampleStore.from_demos(prompt_ids, [ids(0), ids(7)], [False, False])
    for t in range(3):
        store.add_iteration(
            [
                Response(p, torch.tensor(ids(1 + t * 6 + p * 3 + k, eos=k > 0)), -10.0 - k, k == 0, t)
                for p in range(2)
                for k in range(3)
            ]
        )
    store.save(out / "store")
    return out


def train_dpo_args(monkeypatch, argv: list[str]):
    """train_dpo's own args: its `__main__` parses and checks `argv` and is stopped where it starts training."""

    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)

    monkeypatch.setattr("openrlhf.utils.get_strategy", stop)
    monkeypatch.setattr(sys, "argv", ["train_dpo", *argv])
    with pytest.raises(Parsed) as parsed:
        runpy.run_module("openrlhf.cli.train_dpo", run_name="__main__")
    monkeypatch.undo()
    return parsed.value.args[0]


def openrlhf_dpo_dataset(monkeypatch, argv: list[str]):
    """What train_dpo builds from `argv`: its args, strategy, tokenizer, blended data and RewardDataset (is_dpo)."""
    from openrlhf.datasets import RewardDataset
    from openrlhf.datasets.utils import blending_datasets
    from openrlhf.utils import get_strategy, get_tokenizer
    from transformers import AutoModelForCausalLM

    args = train_dpo_args(monkeypatch, argv)
    strategy = get_strategy(args)  # no setup_distributed: the dataset needs only its args
    model = AutoModelForCausalLM.from_pretrained(args.model.model_name_or_path)
    tokenizer = get_tokenizer(args.model.model_name_or_path, model, "right", strategy)
    data = blending_datasets(args.data.dataset, args.data.dataset_probs, strategy, args.train.seed)
    # num_processors=1 instead of train_dpo's 8: the rows are the same, without forking 8 workers for a few pairs
    return RewardDataset(
        data, tokenizer, args.data.max_len, strategy, args.data.input_template, is_dpo=True, num_processors=1
    )


def test_exported_pairs_read_back_by_train_dpo_as_the_runs_tokens(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pairs.jsonl"
    main(["export-pairs", str(run), "--out", str(out)])
    assert "wrote 60 pairs" in capsys.readouterr().out  # as many as the run trained on: 3 x 2 x 10
    records = [json.loads(line) for line in out.read_text().splitlines()]
    counts = kind_counts(60, (0.7, 0.2, 0.1), has_history=True)
    assert [sum(r["kind"] == k for r in records) for k in KINDS] == counts

    # the export is the run's own sampler with the run's fractions and the seed: the same pairs, in order
    store = SampleStore.load(run / "store")
    pairs = PairSampler(store, (0.7, 0.2, 0.1), seed=42).sample(60)
    dataset = openrlhf_dpo_dataset(
        monkeypatch,
        [
            "--data.dataset",
            str(out),
            "--data.prompt_key",
            "prompt",
            "--model.model_name_or_path",
            str(run / "reference"),
        ],
    )
    assert len(dataset) == len(pairs) == len(records)
    eos = AutoTokenizer.from_pretrained(run / "reference").eos_token_id
    for i, (pair, record) in enumerate(zip(pairs, records)):
        assert (record["kind"], record["chosen_iteration"], record["rejected_iteration"]) == (
            KINDS[pair.kind],
            pair.chosen.iteration,
            pair.rejected.iteration,
        )
        chosen_ids, _, rejected_ids, _, prompt_length = dataset[i]
        prompt = store.prompts[pair.chosen.prompt].tolist()
        assert prompt_length == len(prompt)
        for got, response in ((chosen_ids[0].tolist(), pair.chosen), (rejected_ids[0].tolist(), pair.rejected)):
            expected = prompt + response.ids.tolist()
            if response.truncated:  # train_dpo ends every response with an EOS: it appends " " + EOS text
                assert got[: len(expected)] == expected and got[-1] == eos and len(got) == len(expected) + 2
            else:
                assert got == expected, f"row {i}: train_dpo's tokens differ from the run's"
    # the ranking: a demo beats every sample, a later iteration beats an earlier one; online is the newest
    for r in records:
        if r["kind"] == "inter_model":
            assert r["chosen_iteration"] > r["rejected_iteration"] >= 0
        else:
            assert r["chosen_iteration"] == DEMO and (r["rejected_iteration"] == 2) == (r["kind"] == "online")


def test_kinds_and_num(run, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    main(["export-pairs", str(run), "--out", str(out), "--kinds", "replay", "inter_model", "--num", "30"])
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert (kinds.count("online"), kinds.count("replay"), kinds.count("inter_model")) == (0, 20, 10)  # 0.2 : 0.1


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_errors(run, tiny_model_path, tmp_path, capsys):
    out = str(tmp_path / "pairs.jsonl")
    assert "holds no DITTO run" in error_of(["export-pairs", str(tmp_path), "--out", out], capsys)
    assert "invalid choice" in error_of(["export-pairs", str(run), "--out", out, "--kinds", "sideways"], capsys)

    no_inter = tmp_path / "no_inter"
    shutil.copytree(run, no_inter)
    config = json.loads((run / "run_config.json").read_text())
    config["ditto"]["pair_fractions"] = [0.8, 0.2, 0.0]
    (no_inter / "run_config.json").write_text(json.dumps(config))
    msg = error_of(["export-pairs", str(no_inter), "--out", out, "--kinds", "inter_model"], capsys)
    assert "--ditto.pair_fractions" in msg and "--kinds" in msg

    for name in ("iteration_00001.json", "iteration_00002.json"):  # one iteration: online pairs only
        (no_inter / "store" / name).unlink()
    msg = error_of(["export-pairs", str(no_inter), "--out", out, "--kinds", "replay"], capsys)
    assert "one iteration has online pairs only" in msg
    assert not (tmp_path / "pairs.jsonl").exists()


def test_export_from_a_real_run(tiny_model_path, tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": q, "response": SENTENCES[i]}) + "\n" for i, q in enumerate("ABC")))
    run = tmp_path / "run"
    flags = ["--ckpt.output_dir", str(run), "--data.max_len", "64", "--rollout.max_new_tokens", "12",
             "--rollout.n_samples_per_prompt", "2", "--ditto.iterations", "2", "--ditto.resample_every", "1",
             "--ditto.sft_steps", "1", "--train.batch_size", "10", "--ds.lora.rank", "4"]  # fmt: skip
    main([*train_argv(tiny_model_path), *flags, "--data.dataset", str(demos)])
    capsys.readouterr()
    main(["export-pairs", str(run), "--out", str(tmp_path / "pairs.jsonl")])
    printed = capsys.readouterr().out
    assert "wrote 20 pairs (online 14, replay 4, inter_model 2)" in printed  # as many as the run trained on
    # the tiny random model samples byte soup, cut inside characters: the export says train_dpo will see other tokens
    assert "on other tokens than the run's" in printed


def test_nothing_is_overwritten_without_overwrite_and_nothing_in_a_run_folder(run, tmp_path, capsys):
    """--out never replaces a file unasked, never writes into a run folder (its own files: run_config.json), and a
    folder is refused without leaving a temporary file beside it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = (copy / "run_config.json").read_text()
    for out in (copy / "run_config.json", copy / "store" / "demos.json", copy / "pairs.jsonl"):
        for overwrite in ([], ["--overwrite"]):
            msg = refused(main, ["export-pairs", str(copy), "--out", str(out), *overwrite], capsys)
            assert f"--out {out} lies in the DITTO run folder {copy}" in msg
    assert (copy / "run_config.json").read_text() == config and not (copy / "pairs.jsonl").exists()

    mine = tmp_path / "my_demos.jsonl"
    mine.write_text('{"prompt": "mine", "response": "keep me"}\n')
    assert "pass --overwrite to replace it" in refused(main, ["export-pairs", str(copy), "--out", str(mine)], capsys)
    assert mine.read_text() == '{"prompt": "mine", "response": "keep me"}\n'
    main(["export-pairs", str(copy), "--out", str(mine), "--overwrite"])  # asked for: replaced
    assert json.loads(mine.read_text().splitlines()[0])["kind"] in KINDS

    folder = tmp_path / "pairs"
    folder.mkdir()
    assert f"--out {folder} is a folder" in refused(main, ["export-pairs", str(copy), "--out", str(folder)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_demos.jsonl", "pairs", "run"]  # no pairs.tmp

    main(["export-pairs", str(copy), "--out", str(tmp_path / "new" / "pairs.jsonl")])  # the run still works
    assert (tmp_path / "new" / "pairs.jsonl").exists()


def test_a_damaged_run_config_is_named(run, tiny_model_path, tmp_path, capsys):
    """What a clobbered run_config.json used to print: `error: Extra data: line 2 column 1`, naming no file."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "run_config.json").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "Why?", "response": "Because."}\n')
    msg = refused(main, ["export-pairs", str(copy), "--out", str(tmp_path / "pairs.jsonl")], capsys)
    assert msg.startswith(f"{copy / 'run_config.json'} is not valid JSON (Extra data: line 2 column 1")
    msg = refused(
        main,
        [*train_argv(tiny_model_path), "--ckpt.output_dir", str(copy), "--resume", "--data.dataset", str(demos)],
        capsys,
    )
    assert msg.startswith(f"{copy / 'run_config.json'} is not valid JSON")
