"""How fast `openrlhf-ditto serve-reward` answers OpenRLHF over HTTP, against the bound that matters: the two bare
batched forward passes (policy and reference) of the same queries, in-process.

SmolLM2-135M-Instruct on the CPU (fp32) as a LoRA run's policy: one copy of the weights with a random r=32 adapter
on q,k,v,o, scored with the adapter on (policy) and off (reference). The server runs as a real `serve-reward`
process; requests go through OpenRLHF's own reward client (`SingleTurnAgentExecutor._fetch_rewards_via_http`), in
two patterns, each with and without cross-request batching:
  - OpenRLHF's rollouts: --clients concurrent clients, each posting one query per request, --rounds in a row;
  - requests of --clients queries each, --rounds in a row.
Goal: >= 80% of the bound's queries/s with batching, in both patterns. The bound and the server batch --batch_size
queries (8: on a CPU larger batches are slower, their full-vocabulary logits no longer fit the caches).

    python benchmarks/reward_server.py                                 # 64 clients, 256 response tokens (~10 min)
    python benchmarks/reward_server.py --clients 4 --response_tokens 16 --rounds 1    # smoke run, 1-3 minutes
"""

import argparse
import asyncio
import inspect
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # openrlhf's imports on a CPU install

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from openrlhf_ditto.loss import sequence_logps  # noqa: E402
from openrlhf_ditto.models import smollm2_path  # noqa: E402
from openrlhf_ditto.pairs import collate  # noqa: E402
from openrlhf_ditto.reward import DittoReward  # noqa: E402


def build_adapter(base: Path, folder: Path) -> None:
    """A LoRA adapter like a DITTO run's (r=32, alpha=64 on q,k,v,o), with random weights so that it changes the
    model: the adapter does not change the cost of a forward pass, only what it computes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)


def make_queries(tokenizer, n: int, response_tokens: int) -> tuple[list[str], list[str]]:
    """n chat prompts and n responses of about `response_tokens` tokens of text (Python's argparse source), ending
    with the EOS, as OpenRLHF sends them: query = prompt + response."""
    import argparse as source

    ids = tokenizer(inspect.getsource(source), add_special_tokens=False)["input_ids"]
    prompts, queries = [], []
    for i in range(n):
        chat = [{"role": "user", "content": f"Question {i}: explain this part of argparse, line by line."}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        start = (i * 977) % (len(ids) - response_tokens)
        response = tokenizer.decode(ids[start : start + response_tokens], clean_up_tokenization_spaces=False)
        response += tokenizer.eos_token
        prompts.append(prompt)
        queries.append(prompt + response)
    return queries, prompts


def bound(reward: DittoReward, queries: list[str], prompts: list[str], batch_size: int, rounds: int) -> float:
    """Queries/s of the two bare forward passes of the reward, in batches of `batch_size`, tokenized beforehand."""
    items = reward.tokenize(queries, prompts)
    batches = [
        collate([torch.tensor(p) for p, _ in chunk], [torch.tensor(r) for _, r in chunk], reward.pad)
        for chunk in (items[i : i + batch_size] for i in range(0, len(items), batch_size))
    ]
    with torch.no_grad():
        sequence_logps(reward.policy, batches[0])  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            for batch in batches:
                sequence_logps(reward.policy, batch)
                with reward.policy.disable_adapter():
                    sequence_logps(reward.policy, batch)
    return rounds * len(items) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapter: Path, base: Path, batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "openrlhf_ditto.cli.main", "serve-reward", "--policy", str(adapter),
           "--reference", str(base), "--beta", "0.05", "--host", "127.0.0.1", "--port", str(port),
           "--batch_size", str(batch_size), "--data.max_len", "8192"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-reward exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/get_reward"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("serve-reward did not start listening within 300 s")


async def measure(url: str, queries: list[str], prompts: list[str], one_query_requests: bool, rounds: int):
    """(queries/s, request latencies) of `rounds` requests per client: len(queries) clients of one query each, or
    one client posting all queries in each request."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    client = SingleTurnAgentExecutor(remote_rm_url=url)  # OpenRLHF's own HTTP reward client
    latencies = []

    async def post(qs, ps):
        start = time.perf_counter()
        [answer] = await client._fetch_rewards_via_http(qs, ps, [""] * len(qs))
        latencies.append(time.perf_counter() - start)
        assert len(answer["rewards"]) == len(qs)

    async def one_client(q, p):
        for _ in range(rounds):
            await post([q], [p])

    await post(queries[:1], prompts[:1])  # warm-up
    latencies.clear()
    start = time.perf_counter()
    if one_query_requests:
        await asyncio.gather(*(one_client(q, p) for q, p in zip(queries, prompts)))
    else:
        for _ in range(rounds):
            await post(queries, prompts)
    return rounds * len(queries) / (time.perf_counter() - start), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, and queries per request")
    parser.add_argument("--response_tokens", type=int, default=256, help="response tokens per query")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client (and bound passes)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="serve-reward's --batch_size, and the bound's (default: 8, the best on a CPU, where 64 rows of 257 x "
        "49k fp32 logits, 3.2 GB, run at a third of the speed; on a GPU larger batches pay)",
    )
    args = parser.parse_args()

    base = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    queries, prompts = make_queries(tokenizer, args.clients, args.response_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        build_adapter(base, adapter)
        reward = DittoReward(adapter, base, beta=0.05, max_len=8192)
        tokens = sum(len(p) + len(r) for p, r in reward.tokenize(queries, prompts)) / len(queries)
        ceiling = bound(reward, queries, prompts, args.batch_size, args.rounds)
        del reward  # the server process gets the cores and the memory

        rows = []
        for batch_size, setting in ((args.batch_size, "HTTP, cross-request batching"), (1, "HTTP, no batching")):
            proc, url = start_server(adapter, base, batch_size)
            try:
                for one_query in (True, False):
                    qps, latencies = asyncio.run(measure(url, queries, prompts, one_query, args.rounds))
                    rows.append((one_query, f"{setting} (--batch_size {batch_size})", qps, latencies))
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    print(
        f"\nserve-reward on {torch.get_num_threads()} CPU threads, SmolLM2-135M-Instruct fp32, LoRA r=32 adapter "
        f"on/off; {args.clients} queries of {tokens:.0f} tokens ({args.response_tokens} response), "
        f"{args.rounds} round(s)\n"
    )
    print("| requests | setting | queries/s | p50 latency | p99 latency | share of bound |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for one_query in (True, False):
        pattern = f"{args.clients} clients x 1 query" if one_query else f"{args.clients} queries per request"
        bound_row = f"in-process bound: policy + reference forwards in batches of {args.batch_size}"
        print(f"| {pattern} | {bound_row} | {ceiling:.2f} | | | 100% |")
        for kind, setting, qps, latencies in rows:
            if kind == one_query:
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                print(f"| {pattern} | {setting} | {qps:.2f} | {p50:.2f} s | {p99:.2f} s | {qps / ceiling:.0%} |")
    print("\ngoal: >= 80% of the bound with cross-request batching, in both patterns")


if __name__ == "__main__":
    main()
