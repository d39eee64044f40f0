"""Many users in one job (`--data.users`) on the tiny model: each user's result against a single-user run of them,
resume, broken user files, adding a user and new demos to a finished run, per-user metrics."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from openrlhf_ditto.cli.main import main
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import collate
from openrlhf_ditto.store import SampleStore

USERS = {
    "alice": [
        {
            "prompt": "Tell me about errors.",
            "response": "Errors should never pass silently. Unless explicitly silenced.",
        },
        {"prompt": "What is better?", "response": "Beautiful is better than ugly. Explicit is better than implicit."},
    ],
    "bob": [
        {"prompt": "What is better?", "response": "Simple is better than complex. Flat is better than nested."},
        {"prompt": "Namespaces?", "response": "Namespaces are one honking great idea -- let us do more of those!"},
    ],
    "carol": [
        {"prompt": "Now?", "response": "Now is better than never. Although never is often better than right now."},
        {"prompt": "Readability?", "response": "Readability counts. Special cases are not special enough."},
    ],
}
FLAGS = [
    "--data.apply_chat_template", "--data.max_len", "96", "--rollout.max_new_tokens", "24",
    "--rollout.n_samples_per_prompt", "3", "--ditto.iterations", "2", "--ditto.resample_every", "2",
    "--ditto.sft_steps", "3", "--ditto.sft_lr", "1e-3", "--actor.adam.lr", "1e-3",
    "--train.batch_size", "10", "--train.micro_batch_size", "4", "--ds.lora.rank", "4", "--ds.lora.alpha", "8",
]  # fmt: skip


def write_users(folder, users=USERS):
    folder.mkdir(parents=True, exist_ok=True)
    for uid, demos in users.items():
        (folder / f"{uid}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    return folder


def users_argv(model, users, out, *extra) -> list[str]:
    return ["train", "--actor.model_name_or_path", str(model), "--data.dataset", str(users), "--data.users",
            "--ckpt.output_dir", str(out), *FLAGS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory):
    return write_users(tmp_path_factory.mktemp("users") / "users")


@pytest.fixture(scope="module")
def multi_run(tiny_model_path, users_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    main(users_argv(tiny_model_path, users_dir, out))
    return out


def copy_run(run, out, users=None):
    """A copy of a run folder; with `users`, it reads its users from that folder (so --resume accepts it)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("logs", "summary.md"))
    if users is not None:
        config = json.loads((out / "run_config.json").read_text())
        config["data"]["dataset"] = str(users)
        (out / "run_config.json").write_text(json.dumps(config))
    return out


def files_of(folder) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.slow
def test_each_user_ends_as_a_single_user_run_of_them_ends(tiny_model_path, users_dir, multi_run, tmp_path):
    """The bound: a single-user run merges the SFT adapter into the base (x (W + s B A)), a multi-user run keeps it
    as an adapter (x W + s (x A) B). Only the order of float additions differs (fp32 rounding, ~6e-8 of each value),
    so the SFT adapters are bit-identical, every sampled token is the same (a draw would have to land within ~1e-7
    of a boundary of the sampling CDF to flip), reference log-probs agree to ~1e-7 of their size and the DITTO
    adapters to ~1e-7 of a weight; the asserts leave 10-100x room."""
    for uid in USERS:
        single = tmp_path / uid
        argv = ["train", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset",
                str(users_dir / f"{uid}.jsonl"), "--ckpt.output_dir", str(single), *FLAGS]  # fmt: skip
        main(argv)
        user = multi_run / "users" / uid

        for t in range(2):  # the same samples, each scored by the user's own reference
            ours, theirs = (json.loads((r / "store" / f"iteration_{t:05d}.json").read_text()) for r in (user, single))
            assert [s["ids"] for s in ours] == [s["ids"] for s in theirs], f"{uid}, iteration {t}"
            for a, b in zip(ours, theirs):
                assert abs(a["ref_logp"] - b["ref_logp"]) <= 1e-5 * max(1.0, abs(b["ref_logp"]))

        # pi_0: the user's SFT adapter merged as the single-user run merged it is its reference/, bit for bit
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, user / "reference").merge_and_unload().state_dict()
        for name, tensor in load_file(single / "reference" / "model.safetensors").items():
            assert torch.equal(merged[name], tensor), name

        # the DITTO adapter: the second half (in rank) of the user's final/ adapter
        single_adapter = load_file(single / "final" / "adapter" / "adapter_model.safetensors")
        combined = load_file(user / "final" / "adapter_model.safetensors")
        for name, theirs in single_adapter.items():
            r = theirs.shape[0] if "lora_A" in name else theirs.shape[1]
            ours = combined[name][r:] if "lora_A" in name else combined[name][:, r:]
            assert (ours - theirs).abs().max() <= 1e-5, name  # each of the 4 steps moves a weight up to lr 1e-3
            assert not torch.equal(theirs, torch.zeros_like(theirs)), "the DITTO adapter trained"

        # the policies: the single run's merged final/ and the base with the user's one combined adapter
        store = SampleStore.load(user / "store")
        responses = [s for group in store.iterations[-1] for s in group]
        batch = collate([store.prompts[s.prompt] for s in responses], [s.ids for s in responses], 0)
        with torch.no_grad():
            theirs = sequence_logps(AutoModelForCausalLM.from_pretrained(single / "final"), batch)
            base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
            ours = sequence_logps(PeftModel.from_pretrained(base, user / "final"), batch)
        assert ((ours - theirs).abs() <= 1e-5 * theirs.abs().clamp(min=1)).all(), (ours - theirs).abs().max()


def test_users_get_their_own_adapters_metrics_and_a_summary(multi_run):
    users = multi_run / "users"
    assert sorted(p.name for p in users.iterdir()) == sorted(USERS)
    finals = [load_file(users / uid / "final" / "adapter_model.safetensors") for uid in USERS]
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0]), "two users, one adapter"
    config = json.loads((users / "alice" / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # SFT + DITTO, rank 4 + 4, the same scale
    for uid in USERS:
        rows = [json.loads(line) for line in (users / uid / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["prefix"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        assert all(r["online/count"] == 10 for r in train[:2])
        assert all((r["online/count"], r["replay/count"], r["inter_model/count"]) == (7, 2, 1) for r in train[2:])
        assert {"online/acc", "online/margin", "replay/acc", "inter_model/margin"} <= set(train[-1])
        view = json.loads((users / uid / "run_config.json").read_text())  # the user's folder reads as a run
        assert view["user"] == uid and view["data"]["dataset"] == str((users / uid / "demos.jsonl").resolve())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(multi_run / "logs")).Reload().Tags()["scalars"]
    assert {f"{uid}/train/online/acc" for uid in USERS} <= set(tags)
    summary = (multi_run / "summary.md").read_text()
    for uid in USERS:
        assert f"| {uid} | trained now | 4 |" in summary
        assert f"{uid}={(users / uid / 'final').resolve()}" in summary
    assert "vllm serve " in summary and "--enable-lora --max-lora-rank 8 --max-loras 3 --lora-modules" in summary


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_nothing_lost(tiny_model_path, users_dir, multi_run, tmp_path):
    """Each user where a kill can leave them: alice after her first iteration's checkpoint, bob with pi_0 saved and
    no DITTO checkpoint yet, carol finished. --resume ends every user as the uninterrupted run did, bit for bit."""
    out = copy_run(multi_run, tmp_path / "run")
    alice, bob = out / "users" / "alice", out / "users" / "bob"
    for user in (alice, bob):
        shutil.rmtree(user / "final")
        (user / "metrics.jsonl").unlink()
    shutil.rmtree(alice / "checkpoints" / "iter_00002")
    (alice / "store" / "iteration_00001.json").unlink()
    (alice / "checkpoints" / "latest").write_text("iter_00001")
    for name in ("checkpoints", "store"):
        shutil.rmtree(bob / name)
    carol = files_of(out / "users" / "carol")

    main(users_argv(tiny_model_path, users_dir, out, "--resume"))
    assert files_of(out / "users" / "carol") == carol, "a finished user is left as they are"
    for uid in ("alice", "bob"):
        ours, theirs = out / "users" / uid, multi_run / "users" / uid
        for t in range(2):
            name = f"iteration_{t:05d}.json"
            assert (ours / "store" / name).read_bytes() == (theirs / "store" / name).read_bytes(), f"{uid} {name}"
        a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (ours, theirs))
        assert all(torch.equal(a[k], b[k]) for k in b), uid
        rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["prefix"] == "train"] == [1, 2, 3, 4]


def test_a_broken_user_file_is_named_and_nothing_starts(tiny_model_path, multi_run, tmp_path, capsys):
    users = write_users(tmp_path / "users")
    (users / "dave.jsonl").write_text('{"prompt": "Hi", "response": \n')
    (users / "erin.jsonl").write_text('{"question": "Hi", "response": "Hello"}\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(users_argv(tiny_model_path, users, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and not out.exists()
    assert "2 of the 5 user files" in err and "move them out of the folder" in err
    assert f"{users / 'dave.jsonl'}, line 1: not valid JSON" in err and f"{users / 'erin.jsonl'}, record 0" in err

    # added to a finished run, a broken file stops it before anything: the others' work is as it was
    finished = copy_run(multi_run, tmp_path / "finished", users)
    before = files_of(finished)
    with pytest.raises(SystemExit):
        main(users_argv(tiny_model_path, users, finished, "--resume"))
    assert files_of(finished) == before

    (users / "dave.jsonl").unlink()
    (users / "erin.jsonl").unlink()
    write_users(users, {"erin.v2": USERS["alice"]})  # "erin.v2": not an id
    with pytest.raises(SystemExit):
        main(users_argv(tiny_model_path, users, finished, "--resume"))
    assert f"{users / 'erin.v2.jsonl'}: user id 'erin.v2' is not letters, digits" in capsys.readouterr().err

    # new demos for a user who has not finished: refused, nothing touched
    (users / "erin.v2.jsonl").unlink()
    shutil.rmtree(finished / "users" / "bob" / "final")
    write_users(users, {"bob": USERS["bob"][:1]})
    before = files_of(finished)
    with pytest.raises(SystemExit):
        main(users_argv(tiny_model_path, users, finished, "--resume"))
    assert "user bob: their demos changed while their run was unfinished" in capsys.readouterr().err
    assert files_of(finished) == before


def test_every_unusable_user_file_is_named_in_one_pass(tiny_model_path, tmp_path, capsys):
    """An empty file and ids with a space or a dot were named one after the other, a run each; a file of another
    kind and a subfolder were left out without a word."""
    users = write_users(tmp_path / "users", {"alice": USERS["alice"], "erin v2": USERS["bob"]})
    write_users(users, {"frank.v2": USERS["carol"]})
    (users / "dave.jsonl").write_text("")
    (users / "gina.txt").write_text("Hi\nHello\n")
    write_users(users / "old", {"hal": USERS["bob"]})
    (users / ".DS_Store").write_bytes(b"\0")  # the file manager's, not a user's
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(users_argv(tiny_model_path, users, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and not out.exists()
    assert err.startswith(f"error: 5 of the 6 user files in {users} cannot be used"), err
    for line in (
        f"{users / 'dave.jsonl'} is empty",
        f"{users / 'erin v2.jsonl'}: user id 'erin v2' is not letters, digits, _ and - only",
        f"{users / 'frank.v2.jsonl'}: user id 'frank.v2' is not letters",
        f"{users / 'gina.txt'}: not a demo file (.json, .jsonl, .csv, .parquet)",
        f"{users / 'old'}: not a demo file",
    ):
        assert line in err, line
    assert ".DS_Store" not in err


@pytest.mark.slow
def test_a_new_user_or_new_demos_train_only_that_user(tiny_model_path, multi_run, tmp_path):
    users = write_users(tmp_path / "users", {**USERS, "dave": USERS["alice"][:1] + USERS["bob"][1:]})
    out = copy_run(multi_run, tmp_path / "run", users)
    others = {uid: files_of(out / "users" / uid) for uid in USERS}
    main(users_argv(tiny_model_path, users, out, "--resume"))
    assert (out / "users" / "dave" / "final" / "adapter_model.safetensors").exists()
    assert {uid: files_of(out / "users" / uid) for uid in USERS} == others, "the others were not touched"
    assert "| dave | trained now | 4 |" in (out / "summary.md").read_text()

    # bob adds a demo: a new round from his DITTO adapter against the same pi_0. At lr 1e-30 the round changes
    # nothing, so his new final/ must be his last one: it started from it.
    bob = out / "users" / "bob"
    write_users(users, {"bob": [*USERS["bob"], {"prompt": "Errors?", "response": "Errors should never pass."}]})
    reference, last_final = files_of(bob / "reference"), load_file(bob / "final" / "adapter_model.safetensors")
    others = {uid: files_of(out / "users" / uid) for uid in ("alice", "carol", "dave")}
    main(users_argv(tiny_model_path, users, out, "--resume", "--actor.adam.lr", "1e-30"))
    assert {uid: files_of(out / "users" / uid) for uid in ("alice", "carol", "dave")} == others
    assert files_of(bob / "reference") == reference, "pi_0 stays the user's reference"
    new_final = load_file(bob / "final" / "adapter_model.safetensors")
    assert all(torch.equal(new_final[k], last_final[k]) for k in last_final)
    assert len(json.loads((bob / "store" / "demos.json").read_text())["demos"]) == 3
    old_round = bob / "rounds" / "0"
    assert load_file(old_round / "final" / "adapter_model.safetensors").keys() == last_final.keys()
    assert len(json.loads((old_round / "store" / "demos.json").read_text())["demos"]) == 2
    assert not list((bob / "rounds").glob("*.tmp"))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--ds.lora.rank", "0"], "--ds.lora.rank must be >= 1"),
        (["--data.dataset", "FILE"], "is not a folder"),
        (["--data.user_key", "author"], "no user key 'author'"),
        (["--ditto.val_demos", "1"], "--ditto.val_demos is not supported with many users yet"),
        (["--ditto.val_dataset", "FILE"], "--ditto.val_dataset is not supported with many users yet"),
    ],
)
def test_impossible_many_user_settings(tiny_model_path, users_dir, tmp_path, capsys, flags, expected):
    argv = users_argv(tiny_model_path, users_dir, tmp_path / "run", *flags)
    argv = [str(users_dir / "alice.jsonl") if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_user_column_splits_one_file_into_users(tiny_model_path, tmp_path):
    demos = tmp_path / "all.jsonl"
    demos.write_text("".join(json.dumps({**d, "author": uid}) + "\n" for uid in ("alice", "bob") for d in USERS[uid]))
    out = tmp_path / "run"
    main(users_argv(tiny_model_path, demos, out, "--data.user_key", "author", "--ditto.iterations", "1"))
    for uid in ("alice", "bob"):
        saved = [json.loads(line) for line in (out / "users" / uid / "demos.jsonl").read_text().splitlines()]
        assert [d["response"] for d in saved] == [d["response"] for d in USERS[uid]]
        assert (out / "users" / uid / "final" / "adapter_model.safetensors").exists()


def test_serve_reward_takes_one_user_of_the_run(tiny_model_path, multi_run, capsys):
    from openrlhf_ditto.cli.args import hierarchize
    from openrlhf_ditto.cli.main import build_parser
    from openrlhf_ditto.reward import load_reward

    bob = multi_run / "users" / "bob"
    reward = load_reward(hierarchize(build_parser().parse_args(["serve-reward", "--run", str(bob)])))
    store = SampleStore.load(bob / "store")
    samples = [s for group in store.iterations[-1] for s in group]
    rewards = reward([(store.prompts[s.prompt].tolist(), s.ids.tolist()) for s in samples])
    batch = collate([store.prompts[s.prompt] for s in samples], [s.ids for s in samples], 0)
    with torch.no_grad():
        logps = {}
        for name in ("final", "reference"):
            base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
            logps[name] = sequence_logps(PeftModel.from_pretrained(base, bob / name), batch)
    expected = 0.05 * (logps["final"] - logps["reference"])  # the run's beta
    assert torch.allclose(torch.tensor(rewards), expected, atol=1e-5)
    assert torch.allclose(logps["reference"], torch.tensor([s.ref_logp for s in samples]), rtol=1e-6)
    assert expected.abs().max() > 1e-3, "bob's policy moved from his pi_0"

    with pytest.raises(SystemExit):
        main(["serve-reward", "--run", str(multi_run)])
    assert f"--run {multi_run}/users/<id>" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_multi_user_run_gives_a_row_per_user_and_the_average(tiny_model_path, multi_run, tmp_path):
    held_out = tmp_path / "held_out"
    write_users(held_out, {uid: [{"prompt": "What is better?", "response": "Flat."}] for uid in ("alice", "bob")})
    out = tmp_path / "eval"
    main(["eval", "--run", str(multi_run), "--data.dataset", str(held_out), "--output_dir", str(out),
          "--conditions", "zero-shot", "sft", "ditto", "--rollout.n_samples_per_prompt", "2",
          "--judge", "local", "--judge.model", str(tiny_model_path)])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["users"]) == ["alice", "bob"]
    for column in ("DITTO vs zero-shot", "DITTO vs sft"):
        per_user = [results["users"][uid][column] for uid in ("alice", "bob")]
        assert results["average"][column] == pytest.approx(sum(per_user) / 2)
    report = (out / "report.md").read_text()
    assert "| user | DITTO vs zero-shot | DITTO vs sft |" in report and "| **average** |" in report
    assert "Not evaluated (no held-out prompts): carol." in report
    for uid in ("alice", "bob"):
        rows = [json.loads(line) for line in (out / "users" / uid / "generations" / "ditto.jsonl").open()]
        assert rows[0]["model"] == str(multi_run / "users" / uid / "final")
    alice, bob = ((out / "users" / uid / "generations" / "ditto.jsonl").read_text() for uid in ("alice", "bob"))
    assert json.loads(alice.splitlines()[0])["samples"] != json.loads(bob.splitlines()[0])["samples"]


def test_a_nan_stops_only_its_user_and_resume_finishes_them(tiny_model_path, users_dir, tmp_path, capsys):
    from openrlhf_ditto.backends.multi_lora import MultiLoraBackend

    out = tmp_path / "run"
    argv = users_argv(tiny_model_path, users_dir, out, "--ditto.sft_steps", "1")
    real_step, steps = MultiLoraBackend.train_step, []

    def poisoned_step(self, batch):
        metrics = real_step(self, batch)
        steps.append(self.current)
        if self.current == "bob" and steps.count("bob") == 3:  # bob's first step of iteration 2
            metrics["loss"] = float("nan")
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultiLoraBackend, "train_step", poisoned_step)
        with pytest.raises(SystemExit) as e:
            main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "1 of 3 users stopped" in err and "user bob, step 3: loss is nan" in err
    assert steps.count("alice") == steps.count("carol") == 4 and steps.count("bob") == 3
    bob = out / "users" / "bob"
    assert (bob / "checkpoints" / "latest").read_text() == "iter_00001" and not (bob / "final").exists()
    assert json.loads((bob / "metrics.jsonl").read_text().splitlines()[-1])["prefix"] == "stopped"
    assert "| bob | stopped |" in (out / "summary.md").read_text()
    finished = {uid: files_of(out / "users" / uid) for uid in ("alice", "carol")}

    main([*argv, "--resume"])
    assert (bob / "final" / "adapter_model.safetensors").exists()
    assert {uid: files_of(out / "users" / uid) for uid in ("alice", "carol")} == finished
    rows = [json.loads(line) for line in (bob / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["prefix"] == "train"] == [1, 2, 3, 4]
