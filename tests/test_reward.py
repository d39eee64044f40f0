"""serve-reward: DITTO's reward over HTTP on loopback, asked for through OpenRLHF's own rollout and reward client
code (`SingleTurnAgentExecutor` in openrlhf/utils/agent.py), and checked against log-probs computed directly."""

import asyncio
import codecs
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import aiohttp
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.cli.main import main
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import collate

QUESTIONS = ["What is better?", "Tell me about errors.", "Namespaces?", "How should code read?"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_path, tmp_path_factory):
    """A finished DITTO run (LoRA) on the tiny model: reference/, final/ (merged) and final/adapter/."""
    root = tmp_path_factory.mktemp("reward")
    demos = root / "demos.jsonl"
    demos.write_text(
        "".join(json.dumps({"prompt": q, "response": "Explicit is better than implicit."}) + "\n" for q in QUESTIONS)
    )
    out = root / "run"
    main(
        ["train", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos),
         "--ckpt.output_dir", str(out), "--data.apply_chat_template", "--data.max_len", "96",
         "--rollout.max_new_tokens", "16", "--rollout.n_samples_per_prompt", "2", "--ditto.iterations", "2",
         "--ditto.resample_every", "1", "--ditto.sft_steps", "1", "--actor.adam.lr", "1e-2",
         "--train.batch_size", "4", "--train.micro_batch_size", "4", "--ds.lora.rank", "4", "--ds.lora.alpha", "8"]
    )  # fmt: skip
    assert (out / "final" / "adapter").is_dir()
    return out


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return AutoTokenizer.from_pretrained(run_dir / "reference")


@pytest.fixture(scope="module")
def cases(tokenizer):
    """(prompt, response ids): prompts rendered by OpenRLHF's own PromptDataset code (--data.apply_chat_template),
    responses made of whole words, i.e. the tokens the tokenizer gives their text back as (a real model's samples
    almost always are; the protocol carries text, so any server scores a sample by its text's tokens)."""
    from openrlhf.datasets.prompts_dataset import preprocess_data

    with contextlib.redirect_stdout(None):
        import this
    lines = [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line]
    out = []
    for i, line in enumerate(lines):
        prompt, _ = preprocess_data(
            {"input": QUESTIONS[i % len(QUESTIONS)]},
            input_key="input",
            apply_chat_template=tokenizer.apply_chat_template,
        )
        out.append((prompt, tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
    return out


@pytest.fixture(scope="module")
def logratios(run_dir, tokenizer, cases):
    """log pi(y|x) - log pi_ref(y|x) and response length of every case, computed directly, one row at a time (no
    padding), with the merged final model, not the adapter the server uses."""
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(run_dir / "reference", dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, response in cases:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            batch = collate([torch.tensor(prompt_ids)], [torch.tensor(response)], tokenizer.pad_token_id)
            out.append(((sequence_logps(policy, batch) - sequence_logps(reference, batch)).item(), len(response)))
    assert max(abs(x) for x, _ in out) > 0.1, "the DITTO policy did not move from its reference: nothing to check"
    return out


class CannedEngine:
    """Stands in for vLLM's engine, which cannot generate on CPU: answers each prompt with the given token ids.
    Everything else (tokenizing the prompt, decoding the query, the HTTP client) is OpenRLHF's own code."""

    def __init__(self, responses: dict[str, list[int]], tokenizer):
        self.by_prompt_ids = {
            tuple(tokenizer(p, add_special_tokens=False)["input_ids"]): r for p, r in responses.items()
        }

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(
            token_ids=self.by_prompt_ids[tuple(prompt_token_ids)], finish_reason="stop", logprobs=None
        )
        return SimpleNamespace(outputs=[output])


def openrlhf_rewards(url: str, cases, tokenizer) -> list[dict]:
    """One rollout per case, all at once, as OpenRLHF's single-turn rollouts do: each posts its own one query."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    async def rollouts():
        executor = SingleTurnAgentExecutor(remote_rm_url=url)
        params = SimpleNamespace(max_tokens=64, logprobs=None)

        async def one(prompt, response):
            engine = CannedEngine({prompt: response}, tokenizer)
            return await executor.execute(prompt, "", params, 1024, tokenizer, engine)  # max_length: no truncation

        return await asyncio.gather(*(one(p, r) for p, r in cases))

    return asyncio.run(rollouts())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, log=None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def servers(run_dir, tmp_path_factory):
    """Two real `openrlhf-ditto serve-reward` processes: `plain` from --policy/--reference/--beta with every reward
    option and no cross-request batching, and `mixed` from --run, adding 0.5 x plain's rewards."""
    logs = tmp_path_factory.mktemp("server-logs")
    ports = {"plain": free_port(), "mixed": free_port()}
    argv = {
        "plain": ["--policy", str(run_dir / "final"), "--reference", str(run_dir / "reference"), "--beta", "0.3",
                  "--length_normalize", "--scale", "2", "--offset", "0.1", "--clip_range", "-5", "5",
                  "--batch_size", "1"],
        "mixed": ["--run", str(run_dir), "--mix", f"http://127.0.0.1:{ports['plain']}/get_reward=0.5"],
    }  # fmt: skip
    procs = {}
    try:
        for name in ("plain", "mixed"):
            cmd = [sys.executable, "-m", "openrlhf_ditto.cli.main", "serve-reward", "--host", "127.0.0.1"]
            with (logs / f"{name}.log").open("w") as log:
                procs[name] = subprocess.Popen([*cmd, "--port", str(ports[name]), *argv[name]], stdout=log, stderr=log)
        for name, proc in procs.items():
            wait_for_port(ports[name], proc, logs / f"{name}.log")
        yield {name: f"http://127.0.0.1:{port}/get_reward" for name, port in ports.items()}, logs
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)


def plain_reward(logratio: float, length: int) -> float:
    return min(max(2 * 0.3 * logratio / length + 0.1, -5), 5)


@pytest.mark.slow
def test_rewards_through_openrlhf_client(servers, cases, tokenizer, logratios, monkeypatch):
    urls, _ = servers
    plain = openrlhf_rewards(urls["plain"], cases, tokenizer)
    for out, (logratio, length) in zip(plain, logratios):
        assert out["reward"] == pytest.approx([plain_reward(logratio, length)], abs=1e-4)
    # --run: the run's beta (0.05) on its adapter over its reference, plus 0.5 x the plain server's rewards;
    # every case is its own concurrent request: each must get its own reward
    mixed = openrlhf_rewards(urls["mixed"], cases, tokenizer)
    for out, (logratio, length) in zip(mixed, logratios):
        ditto = 0.05 * logratio
        assert out["extra_logs"]["ditto_reward"] == pytest.approx([ditto], abs=1e-4)
        assert out["extra_logs"]["mix0_reward"] == pytest.approx([plain_reward(logratio, length)], abs=1e-4)
        assert out["reward"] == pytest.approx([ditto + 0.5 * plain_reward(logratio, length)], abs=1e-4)
        assert out["scores"] == out["reward"]

    # and OpenRLHF turns the answer into the rollout's Experience: its reward, with each part logged beside it
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # the import reaches flash-attn (CPU install)
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    experience = SamplesGenerator._process_response_into_experience(None, mixed[0], max_len=1024)
    assert experience.rewards.flatten().tolist() == pytest.approx(mixed[0]["reward"])
    assert experience.info["ditto_reward"].flatten().tolist() == pytest.approx(mixed[0]["extra_logs"]["ditto_reward"])


def post(url: str, body) -> tuple[int, str]:
    """A bare HTTP client, to read the error bodies that OpenRLHF's client discards."""

    async def go():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as answer:
                return answer.status, await answer.text()

    return asyncio.run(go())


@pytest.mark.slow
def test_bad_requests_get_clear_errors_and_the_server_stays_up(servers, cases, tokenizer, logratios):
    urls, logs = servers
    prompt, response = cases[0]
    good = prompt + tokenizer.decode(response, skip_special_tokens=False)
    bad = [
        (b'{"query": ["a"', "not valid JSON"),
        ({"query": [good]}, "missing key(s) ['prompts']"),
        ({"query": [good, good], "prompts": [prompt], "labels": ["", ""]}, "same length, got 2, 1 and 2"),
        ({"query": [good, prompt], "prompts": [prompt, prompt]}, "query 1 has an empty response"),
        ({"query": [good, "Hello" + good], "prompts": [prompt, prompt]}, "query 1 does not start with prompts[1]"),
        ({"query": [good + " better" * 100], "prompts": [prompt]}, "over --data.max_len 96"),
        ({"query": good, "prompts": prompt}, "'query' must be a list of strings"),
    ]
    for body, message in bad:
        status, text = post(urls["mixed"], body)
        assert status == 400 and message in json.loads(text)["detail"], (body, text)
    assert "query 1 does not start with prompts[1]" in (logs / "mixed.log").read_text()  # the server says why
    [out] = openrlhf_rewards(urls["mixed"], cases[:1], tokenizer)
    assert out["extra_logs"]["ditto_reward"] == pytest.approx([0.05 * logratios[0][0]], abs=1e-4)


@pytest.fixture
def in_process_server():
    """uvicorn serving an app in a thread of this process, so that a test can watch the reward's forwards."""
    servers = []

    def start(app):
        import uvicorn

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for_port(port)
        return f"http://127.0.0.1:{port}/get_reward"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def test_concurrent_requests_share_forwards(run_dir, in_process_server, cases, tokenizer, logratios):
    from openrlhf_ditto.reward import DittoReward, build_app

    batches = []

    class Watched(DittoReward):
        def __call__(self, items):
            batches.append(len(items))
            return super().__call__(items)

    # batches of at most 4 queries; the first query of a batch waits 200 ms for others (a few ms in real use)
    reward = Watched(run_dir / "final" / "adapter", run_dir / "reference", beta=0.05, max_len=96)
    url = in_process_server(build_app(reward, batch_size=4, batch_wait_ms=200.0))
    rewards = openrlhf_rewards(url, cases, tokenizer)
    assert [r["reward"] for r in rewards] == [[pytest.approx(0.05 * x, abs=1e-4)] for x, _ in logratios]
    assert sum(batches) == len(cases) and max(batches) > 1 and max(batches) <= 4, batches


def test_reward_options_and_a_mix_server_that_is_down(run_dir, in_process_server, cases, tokenizer, logratios):
    from openrlhf_ditto.reward import DittoReward, build_app

    reward = DittoReward(run_dir / "final", run_dir / "reference", beta=0.3, scale=-2.0, offset=0.01)
    queries = [p + tokenizer.decode(r, skip_special_tokens=False) for p, r in cases]
    items = reward.tokenize(queries, [p for p, _ in cases])
    unclipped = [-2.0 * 0.3 * x + 0.01 for x, _ in logratios]
    assert reward(items) == pytest.approx(unclipped, abs=1e-4)
    low, high = sorted(unclipped)[len(cases) // 3], sorted(unclipped)[2 * len(cases) // 3]
    reward.clip_range = (low, high)  # binds on both sides
    assert reward(items) == pytest.approx([min(max(u, low), high) for u in unclipped], abs=1e-4)

    down = f"http://127.0.0.1:{free_port()}/get_reward"
    url = in_process_server(build_app(reward, mix=[(down, 1.0)]))
    prompt, response = cases[0]
    status, text = post(url, {"query": [prompt + tokenizer.decode(response)], "prompts": [prompt]})
    assert status == 502 and f"--mix {down} failed" in json.loads(text)["detail"]


def test_every_request_shape_of_openrlhf_client_is_answered_never_500(
    run_dir, in_process_server, cases, tokenizer, logratios
):
    """An empty list was HTTP 500 (IndexError in the tokenizer), a lone surrogate ("\\ud800") too (TypeError).
    OpenRLHF's client sends labels as its dataset holds them ("" without --data.label_key, else any JSON value) and,
    from `_fetch_rewards_via_http`, several queries per request, sharded over its endpoints (none for no query)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from openrlhf_ditto.reward import DittoReward, build_app

    reward = DittoReward(run_dir / "final" / "adapter", run_dir / "reference", beta=0.05, max_len=96)
    url = in_process_server(build_app(reward))
    down = f"http://127.0.0.1:{free_port()}/get_reward"  # an empty request asks no mixed server
    mixed = in_process_server(build_app(reward, mix=[(down, 1.0)]))
    empty = {"rewards": [], "scores": [], "extra_logs": {"ditto_reward": []}}
    for body in ({"query": [], "prompts": [], "labels": []}, {"query": [], "prompts": []}):
        status, text = post(url, body)
        assert status == 200 and json.loads(text) == empty, text
    status, text = post(mixed, {"query": [], "prompts": [], "labels": []})
    assert status == 200 and json.loads(text) == {**empty, "extra_logs": {"ditto_reward": [], "mix0_reward": []}}

    queries = [p + tokenizer.decode(r, skip_special_tokens=False) for p, r in cases[:3]]
    prompts = [p for p, _ in cases[:3]]
    expected = [pytest.approx(0.05 * x, abs=1e-4) for x, _ in logratios[:3]]
    for labels in (["", "", ""], [None, 3, {"answer": [1, 2]}]):
        status, text = post(url, {"query": queries, "prompts": prompts, "labels": labels})
        assert status == 200 and json.loads(text)["rewards"] == expected, text
    status, text = post(url, {"query": [prompts[0] + "\ud800"], "prompts": [prompts[0]]})
    assert status == 400 and "query[0] is not valid Unicode text" in json.loads(text)["detail"], text

    async def client(endpoints, n):
        executor = SingleTurnAgentExecutor(remote_rm_url=endpoints)
        return await executor._fetch_rewards_via_http(queries[:n], prompts[:n], [""] * n)

    assert asyncio.run(client([url], 0)) == []
    answers = asyncio.run(client([url, url], 3))  # two shards: 2 queries and 1
    assert [r for a in answers for r in a["extra_logs"]["ditto_reward"]] == expected
    [one] = asyncio.run(client([url], 3))
    assert one["rewards"] == expected

    class Broken(DittoReward):  # broken weights: answered 200 with a bare NaN, which PPO would have trained on
        def __call__(self, items):
            return [float("nan")] * len(items)

    broken = Broken(run_dir / "final" / "adapter", run_dir / "reference", beta=0.05, max_len=96)
    status, text = post(in_process_server(build_app(broken)), {"query": queries[:1], "prompts": prompts[:1]})
    assert status == 500 and json.loads(text)["detail"].startswith("the reward of query 0 is nan (1 of 1 not finite)")


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, run_dir, capsys):
    assert "give --run RUN_DIR, or all of --policy, --reference and --beta" in error_of(["serve-reward"], capsys)
    msg = error_of(["serve-reward", "--policy", str(run_dir / "final"), "--reference", str(run_dir)], capsys)
    assert "--beta" in msg
    assert "no run_config.json" in error_of(["serve-reward", "--run", str(tmp_path)], capsys)
    assert "URL=WEIGHT" in error_of(["serve-reward", "--run", str(run_dir), "--mix", "http://x/get_reward"], capsys)
    assert "--batch_size 0: must be >= 1" in error_of(
        ["serve-reward", "--run", str(run_dir), "--batch_size", "0"], capsys
    )


def test_an_oversize_body_is_refused_unread(run_dir, in_process_server, cases, tokenizer):
    """A 10 MB body used to be decoded and tokenized (4.4M tokens, seconds) on the event loop before its refusal."""
    from openrlhf_ditto.reward import DittoReward, build_app

    tokenized = []

    class Watched(DittoReward):
        def tokenize(self, queries, prompts):
            tokenized.append(len(queries))
            return super().tokenize(queries, prompts)

    reward = Watched(run_dir / "final" / "adapter", run_dir / "reference", beta=0.05, max_len=96)
    url = in_process_server(build_app(reward))
    limit = 64 * 2 * 96 * 32  # 64 queries of --data.max_len tokens and their prompts, 32 bytes a token
    prompt, response = cases[0]
    huge = json.dumps({"query": [prompt + "better " * (limit // 7)], "prompts": [prompt]}).encode()

    async def streamed():  # no Content-Length: refused while it streams in
        async with aiohttp.ClientSession() as session:
            chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))

            async def body():
                for chunk in chunks:
                    yield chunk

            async with session.post(url, data=body()) as answer:
                return answer.status, await answer.text()

    for status, text in (post(url, huge), asyncio.run(streamed())):
        assert status == 413, text
        detail = json.loads(text)["detail"]
        assert (
            f"over {limit} bytes" in detail and "a larger --data.max_len" in detail and "--data.max_len 96" in detail
        )
    assert tokenized == []
    good = prompt + tokenizer.decode(response, skip_special_tokens=False)
    status, text = post(url, {"query": [good], "prompts": [prompt]})
    assert status == 200 and tokenized == [1], text


def test_tokenization_keeps_other_clients_waiting_no_longer(run_dir, in_process_server, cases, tokenizer):
    """A request being tokenized (here held until released) no longer blocks the event loop: another request is
    answered meanwhile. Before, the loop tokenized it and every other client waited."""
    from openrlhf_ditto.reward import DittoReward, build_app

    entered, release = threading.Event(), threading.Event()

    class Held(DittoReward):
        def tokenize(self, queries, prompts):
            if "HOLD" in queries[0]:
                entered.set()
                release.wait(timeout=60)
            return super().tokenize(queries, prompts)

    url = in_process_server(build_app(Held(run_dir / "final", run_dir / "reference", beta=0.05, max_len=96)))
    prompt, response = cases[0]
    good = prompt + tokenizer.decode(response, skip_special_tokens=False)
    held = threading.Thread(target=post, args=(url, {"query": [prompt + " HOLD"], "prompts": [prompt]}))
    held.start()
    try:
        assert entered.wait(timeout=30)

        async def meanwhile():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                async with session.post(url, json={"query": [good], "prompts": [prompt]}) as answer:
                    return answer.status

        assert asyncio.run(meanwhile()) == 200 and not release.is_set()
    finally:
        release.set()
        held.join(timeout=60)


def test_a_taken_port_is_refused_before_the_models_load(run_dir, capsys, monkeypatch):
    import openrlhf_ditto.reward as reward

    monkeypatch.setattr(reward, "load_reward", lambda args: pytest.fail("the models loaded before the port check"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        msg = error_of(["serve-reward", "--run", str(run_dir), "--host", "127.0.0.1", "--port", str(port)], capsys)
    assert msg.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there (") and msg.count("\n") == 1


def test_an_adapter_of_another_model_is_one_line(run_dir, tiny_model_path, tmp_path, capsys):
    """An adapter on a reference of other shapes used to end in a traceback of size mismatches."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    argv = ["serve-reward", "--policy", str(run_dir / "final" / "adapter"), "--reference", str(other), "--beta", "1"]
    msg = error_of([*argv, "--port", str(free_port())], capsys)
    assert msg.startswith(f"error: cannot load the policy {run_dir / 'final' / 'adapter'} and its reference {other}")
    assert msg.count("\n") == 1
