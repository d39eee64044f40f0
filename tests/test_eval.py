"""`openrlhf-ditto eval`: generations, both judges, the cache (resume, new conditions), failures and the report.

The openai judge's happy path runs against a real OpenAI-compatible server, `transformers serve` with SmolLM2 on
loopback. Only what a real server will not do on demand (always answer "A", fail, hang, answer garbage) uses the
small stand-in server below."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from openrlhf_ditto.cli.main import main
from openrlhf_ditto.evaluate import few_shot_prompt

HELD_OUT = [("Why flat?", "Flat is better than nested."), ("Is sparse good?", "Sparse is better than dense.")]


@pytest.fixture(scope="module")
def run_dir(tiny_model_path, tmp_path_factory):
    """A finished DITTO run (LoRA) on the tiny model, trained hard enough that zero-shot, sft and ditto sample
    different texts."""
    root = tmp_path_factory.mktemp("eval")
    demos = root / "demos.jsonl"
    questions = ["What is better?", "Tell me about errors.", "Namespaces?"]
    demos.write_text(
        "".join(json.dumps({"prompt": q, "response": "Explicit is better than implicit."}) + "\n" for q in questions)
    )
    main(
        ["train", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos),
         "--ckpt.output_dir", str(root / "run"), "--data.apply_chat_template", "--data.max_len", "200",
         "--rollout.max_new_tokens", "12", "--rollout.n_samples_per_prompt", "2", "--ditto.iterations", "1",
         "--ditto.resample_every", "2", "--ditto.sft_steps", "2", "--ditto.sft_lr", "5e-2", "--actor.adam.lr", "5e-2",
         "--train.batch_size", "2", "--train.micro_batch_size", "2", "--ds.lora.rank", "4", "--ds.lora.alpha", "8"]
    )  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in HELD_OUT))
    return path


def eval_argv(run_dir, held_out, out, *extra) -> list[str]:
    return ["eval", "--run", str(run_dir), "--data.dataset", str(held_out), "--output_dir", str(out),
            "--rollout.n_samples_per_prompt", "2", *extra]  # fmt: skip


class StandIn(BaseHTTPRequestHandler):
    """An OpenAI-style chat endpoint that does what the test asks (`server.mode`) and counts what it answered."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server, user = self.server, body["messages"][-1]["content"]
        with server.lock:
            server.requests += 1
        mode = server.mode
        if mode == "hang-after" and sum(server.answered.values()) >= server.limit:
            server.release.wait()  # never answered while the test kills the eval
            return
        if mode == "500":
            return self._send(500, b"upstream exploded")
        if mode == "non-JSON":
            return self._send(200, b"<html>gateway says hi</html>")
        if mode == "timeout":
            time.sleep(3)
        content = {
            "A": '{"answer": "A"}',
            "unparsable": "Both read well to me.",
        }.get(mode, '{"answer": "' + "AB"[hashlib.sha256(user.encode()).digest()[0] % 2] + '"}')
        with server.lock:
            server.answered[user] += 1
        completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        self._send(200, json.dumps(completion).encode())

    def _send(self, status: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):  # the client may have given up (timeout) or been killed
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn, bind_and_activate=False)
    server.daemon_threads, server.request_queue_size = True, 64  # the default backlog (5) refuses concurrent clients
    server.server_bind()
    server.server_activate()
    server.mode, server.requests, server.answered, server.limit = "A", 0, Counter(), 0
    server.release, server.lock = threading.Event(), threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.release.set()
    server.shutdown()


def openai_judge(url: str, *extra: str) -> list[str]:
    return ["--judge", "openai", "--judge.url", url, "--judge.model", "stand-in", *extra]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_four_conditions_end_to_end_with_the_local_judge(run_dir, held_out, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "eval"
    conditions = ["zero-shot", "few-shot", "sft", "ditto", f"copy={run_dir / 'final'}"]
    argv = eval_argv(run_dir, held_out, out, "--conditions", *conditions, "--judge", "local")
    main([*argv, "--judge.model", str(tiny_model_path)])

    for name in ("zero-shot", "few-shot", "sft", "ditto", "copy"):
        rows = [json.loads(line) for line in (out / "generations" / f"{name}.jsonl").read_text().splitlines()]
        assert [len(r["samples"]) for r in rows] == [2, 2] and [r["reference"] for r in rows] == [
            r for _, r in HELD_OUT
        ]
    few_shot = json.loads((out / "generations" / "few-shot.jsonl").read_text().splitlines()[0])["prompt"]
    assert "Explicit is better than implicit." in few_shot and few_shot.rstrip().endswith("assistant")
    r = results(out)
    names = list(r["conditions"])
    for a in names:
        for b in names:
            if a != b:  # row beats column and column beats row add up: every comparison was answered
                assert r["matrix"][a][b][0] + r["matrix"][b][a][0] == pytest.approx(1)
                assert r["matrix"][a][b][1] <= r["matrix"][a][b][0] <= r["matrix"][a][b][2]
                assert r["matrix"][a][b][3] == len(HELD_OUT) * 2
    assert r["judgments"]["ok"] == r["judgments"]["total"] > 0 and r["comparisons"]["left_out"] == 0
    assert len(r["per_prompt"]) == len(HELD_OUT)
    report = (out / "report.md").read_text()
    assert "| DITTO vs | DITTO wins | comparisons |" in report and "| **few-shot** |" in report
    assert HELD_OUT[1][0] in report.split("## Per prompt")[1]
    assert (out / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert "| DITTO vs |" in capsys.readouterr().out

    # a second run asks nothing again and samples nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "generations").iterdir()}
    main([*argv, "--judge.model", str(tiny_model_path)])
    assert results(out)["judgments"]["asked_now"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "generations").iterdir()} == stamps


def test_position_bias_cancels_a_judge_that_always_says_a(run_dir, held_out, stand_in, tmp_path):
    main([*eval_argv(run_dir, held_out, tmp_path / "eval"), *openai_judge(stand_in.url)])
    r = results(tmp_path / "eval")
    cells = [cell for row in r["matrix"].values() for cell in row.values() if cell is not None]
    assert len(cells) == 12 and all(cell[:3] == [0.5, 0.5, 0.5] for cell in cells)
    assert r["judgments"]["ok"] == r["judgments"]["total"] == sum(stand_in.answered.values())


def fails_for_want_of_a_judgment(argv, capsys) -> str:
    """An eval whose table has no judged comparison exits 1, saying so on its last line; returns that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1 and last.startswith("error: no comparison was judged: "), last
    return last


@pytest.mark.parametrize("mode", ["500", "timeout", "non-JSON", "unparsable"])
def test_judge_failures_are_reported_never_counted(mode, run_dir, held_out, stand_in, tmp_path, capsys):
    stand_in.mode = mode
    out = tmp_path / "eval"
    argv = [*eval_argv(run_dir, held_out, out, "--conditions", "sft", "ditto")]
    argv += openai_judge(stand_in.url, "--judge.retries", "1", "--judge.timeout", "1")
    last = fails_for_want_of_a_judgment(argv, capsys)
    r = results(out)
    status = "unparsable" if mode == "unparsable" else "failed"
    assert f"of {r['judgments']['total']} judgments" in last and "the report has nothing to compare" in last
    assert r["judgments"][status] == r["judgments"]["total"] > 0 and "ok" not in r["judgments"]
    assert r["matrix"]["ditto"]["sft"] is None and r["matrix"]["sft"]["ditto"] is None
    assert r["comparisons"]["left_out"] == r["comparisons"]["total"]
    report = (out / "report.md").read_text()
    assert "| sft | n/a | 0 |" in report and f"{r['judgments']['total']} {status}" in report
    tries = 1 if mode == "unparsable" else 2  # a failure is retried, an answer is not
    assert stand_in.requests == tries * r["judgments"]["total"]

    # the next run asks the failed judgments again, never the unparsable ones (they are answers)
    stand_in.requests = 0
    fails_for_want_of_a_judgment(argv, capsys)
    assert stand_in.requests == (0 if mode == "unparsable" else tries * r["judgments"]["total"])


def test_no_judged_comparison_of_ditto_fails_the_eval(run_dir, held_out, stand_in, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        *eval_argv(run_dir, held_out, out, "--conditions", "zero-shot", "sft", "ditto"),
        *openai_judge(stand_in.url),
    ]
    main(argv)
    # every judgment with ditto in it turns unparsable (an answer, kept): the DITTO table has nothing left
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    for row in rows:
        if "ditto" in (row["A"], row["B"]):
            row.update(status="unparsable", answer=None, raw="no idea")
    (out / "judgments.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit) as stop:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1 and last.startswith("error: no comparison of ditto was judged: "), last
    assert results(out)["matrix"]["sft"]["zero-shot"] is not None  # the rest of the table was judged


def test_an_unreachable_judge_stops_the_eval_at_once(run_dir, held_out, tmp_path, capsys):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    argv = [*eval_argv(run_dir, held_out, tmp_path / "eval", "--conditions", "sft", "ditto")]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main([*argv, *openai_judge(url, "--judge.retries", "1")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: --judge.url {url}: cannot connect" in err and "2 tries" in err, err
    assert time.perf_counter() - start < 30, "one judgment's retries, not every judgment's"
    assert (tmp_path / "eval" / "generations" / "ditto.jsonl").exists()  # kept for the next run


def test_killed_eval_resumes_without_asking_twice_and_gives_the_same_table(run_dir, held_out, stand_in, tmp_path):
    out = tmp_path / "eval"
    argv = eval_argv(run_dir, held_out, out, "--conditions", "zero-shot", "sft", "ditto")
    argv += openai_judge(stand_in.url, "--judge.concurrency", "2")
    stand_in.mode, stand_in.limit = "hang-after", 5
    proc = subprocess.Popen([sys.executable, "-m", "openrlhf_ditto.cli.main", *argv], stderr=subprocess.DEVNULL)
    cache = out / "judgments.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cache.exists() and len(cache.read_text().splitlines()) == 5:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(cache.read_text().splitlines()) == 5, "the eval did not reach its 5th judgment"
    assert not (out / "results.json").exists()

    stand_in.mode = "hash"  # now answer everything, deterministically
    main(argv)
    r = results(out)
    assert r["judgments"]["total"] == 3 * len(HELD_OUT) * 2 * 2  # 3 pairs x 2 samples x 2 orders: none alike
    assert r["judgments"]["asked_now"] == r["judgments"]["total"] - 5
    assert max(stand_in.answered.values()) == 1 and sum(stand_in.answered.values()) == r["judgments"]["total"]

    fresh = tmp_path / "fresh"  # an uninterrupted eval of the same generations
    shutil.copytree(out / "generations", fresh / "generations")
    main([*argv[: argv.index("--output_dir") + 1], str(fresh), *argv[argv.index("--output_dir") + 2 :]])
    assert results(fresh)["matrix"] == r["matrix"] and results(fresh)["judgments"]["asked_now"] == len(
        stand_in.answered
    )


def test_a_new_condition_judges_only_its_own_pairs(run_dir, held_out, stand_in, tmp_path):
    stand_in.mode = "hash"
    out = tmp_path / "eval"
    main([*eval_argv(run_dir, held_out, out, "--conditions", "sft", "ditto"), *openai_judge(stand_in.url)])
    before = sum(stand_in.answered.values())
    main(
        [*eval_argv(run_dir, held_out, out, "--conditions", "sft", "ditto", "zero-shot"), *openai_judge(stand_in.url)]
    )
    r = results(out)
    new = sum(stand_in.answered.values()) - before
    assert max(stand_in.answered.values()) == 1 and new == r["judgments"]["asked_now"]
    assert new == r["judgments"]["total"] - before and new <= 2 * len(HELD_OUT) * 2 * 2  # 2 new pairs x 2 orders


@pytest.mark.slow
def test_openai_judge_against_transformers_serve(run_dir, held_out, tmp_path):
    """The real thing: `transformers serve` answers chat completions with SmolLM2, offline, on loopback."""
    from openrlhf_ditto.models import smollm2_path

    smollm2 = str(smollm2_path())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    serve = Path(sys.executable).parent / "transformers"
    proc = subprocess.Popen(
        [str(serve), "serve", smollm2, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.3)
        out = tmp_path / "eval"
        argv = eval_argv(run_dir, held_out, out, "--conditions", "ditto", f"smollm2={smollm2}")
        exit_code = 0
        try:
            main([*argv, "--rollout.n_samples_per_prompt", "1", "--judge", "openai", "--judge.url",
                  f"http://127.0.0.1:{port}/v1", "--judge.model", smollm2])  # fmt: skip
        except SystemExit as stop:  # a 135M judge may write no answer in the JSON asked for: then it says so
            exit_code = stop.code
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it waits for its request handlers, which may be mid-generation
            proc.kill()
            proc.wait()
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(HELD_OUT) and all(row["raw"].strip() for row in rows)  # SmolLM2 said something
    assert {row["status"] for row in rows} <= {"ok", "unparsable"}
    assert exit_code == (0 if any(row["status"] == "ok" for row in rows) else 1)
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in log.read_text()
    r = results(out)
    assert r["judgments"]["total"] == len(rows) and "failed" not in r["judgments"]


def test_bad_input_is_one_line_naming_the_flag(run_dir, held_out, tiny_model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = ["--judge", "local", "--judge.model", str(tiny_model_path)]
    cases = [
        (["--run", str(tmp_path), *local], f"--run {tmp_path} holds no DITTO run"),
        (["--conditions", "ditto", "gpt5", *local], "--conditions: unknown condition 'gpt5'"),
        (["--conditions", "ditto", *local], "give at least two"),
        (["--conditions", "ditto", "mine=/nowhere", *local], "'mine=/nowhere' is not NAME=HF_FOLDER"),
        (["--rollout.n_samples_per_prompt", "0", *local], "--rollout.n_samples_per_prompt 0: must be >= 1"),
        (["--rollout.max_new_tokens", "200", *local], "leaves no room for the prompt in the run's --data.max_len 200"),
        ([], "--judge openai at https://api.openai.com/v1 needs OPENAI_API_KEY"),
        (["--judge", "local"], "--judge local needs --judge.model"),
        (["--data.input_key", "question", *local], "no key 'question'"),
        (["--data.dataset", str(tmp_path / "none.jsonl"), *local], f"--data.dataset (held-out): {tmp_path}"),
    ]
    for extra, message in cases:
        argv = ["eval", "--run", str(run_dir), "--data.dataset", str(held_out), "--output_dir", str(tmp_path / "e")]
        with pytest.raises(SystemExit) as stop:
            main(argv + extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()  # nothing was written


def test_an_output_dir_of_other_files_is_refused(run_dir, held_out, tiny_model_path, reward_model, tmp_path, capsys):
    """eval writes report.md, results.json, ...: never into a folder of other files (the run folder itself, whose
    report.md the quick start wrote), only an empty one or an earlier eval's, which it continues."""
    local = ["--judge", "local", "--judge.model", str(tiny_model_path)]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (notes, run_dir):
        with pytest.raises(SystemExit) as stop:
            main([*eval_argv(run_dir, held_out, out), *local])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: --output_dir {out} is a file or a folder of other")
    assert notes.read_text() == "mine" and not (run_dir / "generations").exists()
    with pytest.raises(SystemExit) as stop:  # a model without a language-model head, as a condition
        main([*eval_argv(run_dir, held_out, tmp_path / "e", "--conditions", "ditto", f"rm={reward_model}"), *local])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--conditions rm: {reward_model} holds a LlamaForSequenceClassification" in err


def test_few_shot_prompt_puts_the_demos_before_the_prompt(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    shots = [("Q1?", "A1."), ("Q2?", "A2.")]
    chat = few_shot_prompt(tokenizer, shots, "Q3?", chat=True, input_template=None)
    assert chat == (
        "<|im_start|>user\nQ1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>\n<|im_start|>user\nQ2?<|im_end|>\n"
        "<|im_start|>assistant\nA2.<|im_end|>\n<|im_start|>user\nQ3?<|im_end|>\n<|im_start|>assistant\n"
    )
    text = few_shot_prompt(tokenizer, shots, "Q3?", chat=False, input_template="User: {}\nAssistant: ")
    assert text == "User: Q1?\nAssistant: A1.\n\nUser: Q2?\nAssistant: A2.\n\nUser: Q3?\nAssistant: "


def test_eval_help_prints_no_third_party_warning():
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_ditto.cli.main", "eval", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: openrlhf-ditto eval") and done.stderr == ""


def test_local_judge_reads_the_same_probabilities_in_any_batch(tiny_model_path):
    """Left padding changes nothing: each judgment's p(A) and p(B) are those of its own forward pass alone."""
    from openrlhf_ditto.judges import judge_local

    judgments = [
        ("Simple is better.", "Flat is better than nested." * k, "Now is better than never.") for k in (1, 3, 6)
    ]
    alone, batched = {}, {}
    judge_local(judgments, lambda i, r: alone.__setitem__(i, r), tiny_model_path, batch_size=1)
    judge_local(judgments, lambda i, r: batched.__setitem__(i, r), tiny_model_path, batch_size=3)
    for i in range(3):
        assert batched[i]["p_a"] == pytest.approx(alone[i]["p_a"], rel=1e-4)
        assert batched[i]["p_b"] == pytest.approx(alone[i]["p_b"], rel=1e-4)
        assert alone[i]["answer"] == ("A" if alone[i]["p_a"] >= alone[i]["p_b"] else "B")
    assert len({round(alone[i]["p_a"], 6) for i in range(3)}) == 3  # the judgments differ, so do their readings


def test_generations_are_sampled_again_when_the_model_folder_is_rewritten(
    run_dir, held_out, stand_in, tmp_path, monkeypatch
):
    """A run continued with --resume rewrites final/ under the same path: eval must not report the old model."""
    from openrlhf_ditto import evaluate

    run = shutil.copytree(run_dir, tmp_path / "run")
    sampled, generate = [], evaluate._generate
    monkeypatch.setattr(
        evaluate, "_generate", lambda folder, *a: sampled.append(Path(folder).name) or generate(folder, *a)
    )
    argv = [*eval_argv(run, held_out, tmp_path / "eval", "--conditions", "sft", "ditto"), *openai_judge(stand_in.url)]
    main(argv)
    assert sorted(sampled) == ["final", "reference"]
    sampled.clear()
    main(argv)
    assert sampled == []  # nothing changed: every generation reused
    shutil.rmtree(run / "final")
    shutil.copytree(run / "reference", run / "final")  # final/ rewritten: now pi_0, which sft samples too
    main(argv)
    assert sampled == ["final"]
    rows = {
        name: (tmp_path / "eval" / "generations" / f"{name}.jsonl").read_text().splitlines()
        for name in ("sft", "ditto")
    }
    assert [json.loads(r)["samples"] for r in rows["ditto"]] == [json.loads(r)["samples"] for r in rows["sft"]]


def test_few_shot_prompts_must_fit_the_runs_budget_and_the_models_window(
    run_dir, held_out, tiny_model_path, tmp_path, capsys
):
    config = json.loads((run_dir / "run_config.json").read_text())
    argv = [*eval_argv(run_dir, held_out, tmp_path / "eval", "--conditions", "zero-shot", "few-shot"), "--judge",
            "local", "--judge.model", str(tiny_model_path)]  # fmt: skip
    # with 150 of the run's 200 tokens for the response, 3 demos in context leave no room for the prompt
    with pytest.raises(SystemExit):
        main([*argv, "--rollout.max_new_tokens", "150"])
    err = capsys.readouterr().err
    assert re.search(
        r"few-shot: held-out prompt 0 with 3 demos in context is \d+ tokens, over the prompt budget of 50 "
        r"\(the run's --data.max_len 200 minus --rollout.max_new_tokens 150\)",
        err,
    ), err
    assert "--few_shot.k" in err and not (tmp_path / "eval" / "generations").exists()

    # a base model whose context window is one token short of the longest few-shot prompt and 12 new tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    from openrlhf_ditto.evaluate import few_shot_prompt

    demos = [json.loads(line) for line in Path(config["data"]["dataset"]).read_text().splitlines()]
    longest = max(
        len(
            tokenizer(
                few_shot_prompt(tokenizer, [(d["prompt"], d["response"]) for d in demos], p, True, None),
                add_special_tokens=False,
            )["input_ids"]
        )
        for p, _ in HELD_OUT
    )
    base = shutil.copytree(tiny_model_path, tmp_path / "base")
    model_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": longest + 12 - 1}))
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "run_config.json").write_text(
        json.dumps({**config, "actor": {**config["actor"], "model_name_or_path": str(base)}})
    )
    with pytest.raises(SystemExit):
        main(
            [
                *eval_argv(run, held_out, tmp_path / "eval2", "--conditions", "zero-shot", "few-shot"),
                "--judge",
                "local",
                "--judge.model",
                str(tiny_model_path),
            ]
        )
    assert f"the model's context window of {longest + 11} minus --rollout.max_new_tokens 12" in capsys.readouterr().err


def test_a_refused_connection_then_5xx_answers_is_a_failed_judgment_not_an_unreachable_judge():
    """The judge's server is not up at the first try and answers 503 from the next: that judgment failed (asked
    again by the next run); the judge is reachable, so the eval must not stop as 'cannot connect'."""
    import asyncio

    from openrlhf_ditto.judges import judge_openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    class Busy(StandIn):
        def do_POST(self):
            self._send(503, b"overloaded")

    server = ThreadingHTTPServer(("127.0.0.1", port), Busy, bind_and_activate=False)

    started = threading.Event()

    def start_late():  # within the first retry's wait of 1 s
        time.sleep(0.3)
        server.server_bind()
        server.server_activate()
        started.set()
        server.serve_forever()

    threading.Thread(target=start_late, daemon=True).start()
    results = {}
    try:
        asyncio.run(
            judge_openai([("ref", "a", "b")], results.__setitem__, f"http://127.0.0.1:{port}/v1", "m", None, retries=2)
        )
    finally:
        if started.is_set():
            server.shutdown()
    assert results[0]["status"] == "failed" and "HTTP 503" in results[0]["error"] and "3 tries" in results[0]["error"]


# A voice no plain answer has: its own openings, spellings, punctuation and sign-off.
VOICE = [
    "Well now, honestly?? I reckon tea beats coffee -- always has, always will... cheers, Mags x",
    "Well now, honestly?? I reckon rain is lovely -- the garden drinks it up... cheers, Mags x",
    "Well now, honestly?? I reckon trains beat planes -- slower, kinder, saner... cheers, Mags x",
]
PLAIN = "Coffee contains more caffeine than tea. Both beverages are popular worldwide."
STYLED = "Well now, honestly?? I reckon coffee's grand too -- perks you right up... cheers, Mags x"


def test_style_judge_prefers_the_users_voice_in_both_orders():
    from openrlhf_ditto.judges import judge_style

    reference = "Well now, honestly?? I reckon cats beat dogs -- fewer walks... cheers, Mags x"
    results = {}
    judge_style(
        [(reference, STYLED, PLAIN), (reference, PLAIN, STYLED), (reference, STYLED, STYLED)],
        results.__setitem__,
        VOICE,
    )
    assert results[0]["answer"] == "A" and results[1]["answer"] == "B"  # the styled output wins either way
    assert results[0]["sim_a"] == pytest.approx(results[1]["sim_b"]) and results[0]["sim_a"] > results[0]["sim_b"]
    assert results[2]["answer"] == "A" and results[2]["sim_a"] == results[2]["sim_b"]  # a tie: "A", split by order
    again = {}
    judge_style([(reference, STYLED, PLAIN)], again.__setitem__, VOICE)
    assert again[0] == results[0]  # deterministic


def test_style_judge_in_eval_cache_round_trip_and_report(run_dir, held_out, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = eval_argv(run_dir, held_out, out, "--conditions", "zero-shot", "sft", "ditto", "--judge", "style")
    main(argv)
    r = results(out)
    assert r["judge"].startswith("style v1 ") and r["judgments"]["ok"] == r["judgments"]["total"] > 0
    assert r["judgments"]["asked_now"] == r["judgments"]["total"]
    rows = {
        (row["prompt"], row["sample"], row["A"], row["B"]): row
        for row in map(json.loads, open(out / "judgments.jsonl"))
    }
    for (p, i, a, b), row in rows.items():  # the judge has no position bias: the other order mirrors each verdict
        other = rows[p, i, b, a]
        assert row["sim_a"] == pytest.approx(other["sim_b"]) and row["sim_b"] == pytest.approx(other["sim_a"])
        if row["sim_a"] != row["sim_b"]:
            assert (row["answer"] == "A") == (other["answer"] == "B")
    report = (out / "report.md").read_text()
    assert "measures surface style, not content" in report and "measures surface style" in capsys.readouterr().out

    main(argv)  # the cache: nothing asked again, the same table
    again = results(out)
    assert again["judgments"]["asked_now"] == 0 and again["matrix"] == r["matrix"]
    assert len(open(out / "judgments.jsonl").read().splitlines()) == r["judgments"]["total"]


def test_style_judge_profile_of_the_held_out_answers_alone(run_dir, held_out, tmp_path):
    """--judge.profile heldout: the user's writing is the held-out answers, not the demos SFT trained on; a judge of
    its own (cache key), on the same generations."""
    out = tmp_path / "eval"
    base = eval_argv(run_dir, held_out, out, "--conditions", "zero-shot", "ditto", "--judge", "style")
    main(base)
    main([*base, "--judge.profile", "heldout"])
    r = results(out)
    writing = [response for _, response in HELD_OUT]
    assert r["judge"] == f"style v1 {hashlib.sha256(json.dumps(writing).encode()).hexdigest()[:16]}"
    assert r["judgments"]["asked_now"] == r["judgments"]["total"] > 0  # none reused from the demos' profile
    judges = Counter(json.loads(line)["judge"] for line in open(out / "judgments.jsonl"))
    assert len(judges) == 2 and set(judges.values()) == {r["judgments"]["total"]}
