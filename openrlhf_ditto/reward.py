"""DITTO's implicit reward, served in OpenRLHF's remote reward protocol (train_ppo_ray's reward.remote_url).

A DITTO policy and its frozen reference define a reward learned from the demos (the DPO implicit reward):
    r(x, y) = beta * (log pi_ditto(y|x) - log pi_ref(y|x)), summed over the response tokens
(or averaged, with --length_normalize), then scale * r + offset, clipped to --clip_range. With --mix the answer is
that plus weight * reward of each other OpenRLHF-protocol server, so one URL gives PPO "your RM + DITTO's style".

Protocol (openrlhf/utils/agent.py, cli/serve_rm.py): POST /get_reward {"query": [...], "prompts": [...],
"labels": [...]}, where query = prompt + response decoded with special tokens kept; the answer is {"rewards",
"scores", "extra_logs"}, one value per query. OpenRLHF's rollouts post one query per request, many at once, so
queries of concurrent requests are gathered (up to --batch_size, --batch_wait_ms) into one forward of both models.
"""

import asyncio
import json
import logging
import math
import socket
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.models import check_causal_lm, check_weights, param_dtype
from openrlhf_ditto.pairs import collate
from openrlhf_ditto.runfolder import read_run_config

logger = logging.getLogger("uvicorn.error")  # uvicorn's own log, so that our lines show beside its
# A request body is refused over QUERIES_PER_REQUEST x 2 (query, prompt) x --data.max_len x JSON_BYTES_PER_TOKEN
# bytes: a token is a few characters, and JSON writes a non-ASCII one as \uXXXX escapes (6 or 12 bytes each).
QUERIES_PER_REQUEST = 64
JSON_BYTES_PER_TOKEN = 32


class DittoReward:
    """The two log-prob passes and the reward's shape. `policy` is a Hugging Face folder, or a PEFT adapter folder
    trained on top of `reference`: then one copy of the weights serves both, the reference with the adapter off. For
    a user of a multi-user run both are adapters of one base model, which holds the two."""

    def __init__(
        self,
        policy: str | Path,
        reference: str | Path,
        beta: float,
        length_normalize: bool = False,
        scale: float = 1.0,
        offset: float = 0.0,
        clip_range: tuple[float, float] | None = None,
        max_len: int = 2048,
        dtype: str | None = None,
    ):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = param_dtype(dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(reference)
            self.reference = None  # None: self.policy computes the reference too (`_as_reference`)
            if (Path(reference) / "adapter_config.json").exists():  # a multi-user run's user
                from peft import PeftModel

                base = json.loads((Path(reference) / "adapter_config.json").read_text())["base_model_name_or_path"]
                model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(self.device)
                self.policy = PeftModel.from_pretrained(model, policy, adapter_name="policy").eval()
                self.policy.load_adapter(reference, adapter_name="reference")
            else:
                self.policy = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype).to(self.device).eval()
                if (Path(policy) / "adapter_config.json").exists():
                    from peft import PeftModel

                    self.policy = PeftModel.from_pretrained(self.policy, policy).eval()
                else:
                    self.reference = self.policy
                    self.policy = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype).to(self.device).eval()
                    vocab = [m.get_input_embeddings().num_embeddings for m in (self.policy, self.reference)]
                    if vocab[0] != vocab[1]:  # the queries are tokenized once, for both
                        raise ValueError(f"their vocabularies differ ({vocab[0]} and {vocab[1]} tokens)")
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: an adapter of another model's shapes
            raise FileNotFoundError(
                f"cannot load the policy {policy} and its reference {reference} ({str(e).splitlines()[0]}); --policy "
                "and --reference take Hugging Face model folders (--policy may also be a PEFT adapter trained on "
                "--reference)"
            ) from e
        tokenizer = self.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.beta, self.length_normalize, self.scale, self.offset = beta, length_normalize, scale, offset
        self.clip_range = clip_range
        self.max_len = max_len

    @contextmanager
    def _as_reference(self):
        """self.policy as the reference: its adapter off (pi_0 is the model under it), or a multi-user run's user's
        reference adapter on in place of their policy adapter."""
        if "reference" not in self.policy.peft_config:
            with self.policy.disable_adapter():
                yield
            return
        self.policy.set_adapter("reference")
        try:
            yield
        finally:
            self.policy.set_adapter("policy")

    def tokenize(self, queries: list[str], prompts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per query, the rollout's own tokens. OpenRLHF tokenizes the prompt for vLLM
        and sends query = decode(prompt ids + response ids). The response ids are taken from the tokenization of
        the whole query, after the prompt's ids: tokenized on its own, a SentencePiece tokenizer would give the
        response a leading "▁" token the rollout never produced. Where the prompt's ids are not a prefix there (a
        template ending in a space that the response's first token swallows), the response is tokenized on its
        own. Either way the ids must decode back to the query, or the query is refused: a reward is never
        computed on tokens other than the rollout's."""
        tokenizer = self.tokenizer
        if not queries:  # the tokenizer raises IndexError on an empty list
            return []
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        items = []
        for i, (query, prompt, p) in enumerate(zip(queries, prompts, prompt_ids)):
            if not p:
                raise ValueError(
                    f"prompts[{i}] is {prompt!r}, no tokens: there is nothing to predict its response from"
                )
            # a legacy SentencePiece tokenizer decodes "<s>[INST]" as "<s> [INST]": the query holds the decoded prompt
            head = next(
                (h for h in (prompt, tokenizer.decode(p, skip_special_tokens=False)) if query.startswith(h)), None
            )
            if head is None:
                raise ValueError(
                    f"query {i} does not start with prompts[{i}]; OpenRLHF sends query = prompt + response "
                    f"(query starts {query[: len(prompt) + 20]!r}, prompt is {prompt[:200]!r})"
                )
            if len(query) == len(head):
                raise ValueError(f"query {i} has an empty response: it equals prompts[{i}]")
            whole = tokenizer(prompt + query[len(head) :], add_special_tokens=False)["input_ids"]
            r = whole[len(p) :] if whole[: len(p)] == p else None
            if r is None or tokenizer.decode(p + r, skip_special_tokens=False) != query:
                r = tokenizer(query[len(head) :], add_special_tokens=False)["input_ids"]
                if tokenizer.decode(p + r, skip_special_tokens=False) != query:
                    raise ValueError(
                        f"query {i}: no tokens of its response after prompts[{i}]'s tokens decode back to the query "
                        "(the prompt's last token merges with the response's first); this server cannot tell which "
                        "tokens the rollout produced"
                    )
            if len(p) + len(r) > self.max_len:
                raise ValueError(
                    f"query {i} is {len(p) + len(r)} tokens ({len(p)} prompt + {len(r)} response), over "
                    f"--data.max_len {self.max_len}; restart the server with a larger --data.max_len"
                )
            items.append((p, r))
        return items

    @torch.no_grad()
    def __call__(self, items: list[tuple[list[int], list[int]]]) -> list[float]:
        """Rewards of a batch of (prompt ids, response ids): one forward of the policy, one of the reference."""
        batch = collate([torch.tensor(p) for p, _ in items], [torch.tensor(r) for _, r in items], self.pad)
        batch = batch.to(self.device)
        logratio = sequence_logps(self.policy, batch)
        if self.reference is None:
            with self._as_reference():
                logratio -= sequence_logps(self.policy, batch)
        else:
            logratio -= sequence_logps(self.reference, batch)
        if self.length_normalize:
            logratio /= batch.action_mask.sum(-1)
        rewards = self.scale * self.beta * logratio.float() + self.offset
        if self.clip_range is not None:
            rewards = rewards.clamp(*self.clip_range)
        return rewards.cpu().tolist()


def load_reward(args: SimpleNamespace) -> DittoReward:
    """The reward of `openrlhf-ditto serve-reward`'s flags: a run folder (its final policy, its reference and its
    beta), or --policy / --reference / --beta."""
    max_len = args.data.max_len
    if args.run is not None:
        if args.policy or args.reference:
            raise ValueError("give either --run or --policy and --reference, not both")
        run = Path(args.run)
        if (run / "users").is_dir():
            users = ", ".join(sorted(p.name for p in (run / "users").iterdir()))
            raise FileNotFoundError(
                f"--run {run} holds many users' runs ({users}); serve one user's reward with --run {run}/users/<id>"
            )
        if not (run / "run_config.json").exists():
            raise FileNotFoundError(
                f"--run {run} holds no DITTO run (no run_config.json); give the --ckpt.output_dir of "
                "`openrlhf-ditto train`, or --policy, --reference and --beta"
            )
        if not (run / "final").is_dir():
            raise FileNotFoundError(
                f"--run {run} has no final/ model: the run has not finished; finish it with `openrlhf-ditto train "
                "... --resume`, or give --policy, --reference and --beta"
            )
        config = read_run_config(run)
        beta = config["ditto"]["beta"] if args.beta is None else args.beta
        max_len = max_len or config["data"]["max_len"]
        adapter = run / "final" / "adapter"
        policy, reference = (adapter if adapter.is_dir() else run / "final"), run / "reference"
        flags = (f"--run {run}:",) * 2
    else:
        if not (args.policy and args.reference and args.beta is not None):
            raise ValueError("give --run RUN_DIR, or all of --policy, --reference and --beta")
        policy, reference, beta = args.policy, args.reference, args.beta
        flags = ("--policy", "--reference")
        check_causal_lm(reference, "--reference")
        if not (Path(policy) / "adapter_config.json").exists():
            check_causal_lm(policy, "--policy")
    for flag, folder in zip(flags, (policy, reference)):
        check_weights(folder, flag)
    return DittoReward(
        policy,
        reference,
        beta,
        length_normalize=args.length_normalize,
        scale=args.scale,
        offset=args.offset,
        clip_range=tuple(args.clip_range) if args.clip_range else None,
        max_len=max_len or 2048,
        dtype=args.ds.param_dtype,
    )


def _parse(data) -> tuple[list[str], list[str], list]:
    if not isinstance(data, dict):
        raise ValueError(
            f'the body must be a JSON object {{"query": [...], "prompts": [...]}}, got {json.dumps(data)[:200]}'
        )
    missing = [k for k in ("query", "prompts") if k not in data]
    if missing:
        raise ValueError(f"missing key(s) {missing}; the body needs 'query' and 'prompts' (and optional 'labels')")
    queries, prompts = data["query"], data["prompts"]
    for key, value in (("query", queries), ("prompts", prompts)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"'{key}' must be a list of strings, got {json.dumps(value)[:200]}")
        for i, x in enumerate(value):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800": the tokenizer would raise a TypeError
                raise ValueError(f"{key}[{i}] is not valid Unicode text ({e.reason} at character {e.start})") from None
    labels = data.get("labels", [""] * len(queries))
    if not isinstance(labels, list) or not len(queries) == len(prompts) == len(labels):
        raise ValueError(
            f"'query', 'prompts' and 'labels' must be lists of the same length, got {len(queries)}, {len(prompts)} "
            f"and {len(labels) if isinstance(labels, list) else repr(labels)[:50]}"
        )
    return queries, prompts, labels


async def _batch_forever(reward: DittoReward, queue: asyncio.Queue, batch_size: int, wait_s: float) -> None:
    """Take what queued up during the last forward (or arrives within `wait_s` of the first query), up to
    `batch_size` queries, and score them in one forward, in a thread so that the event loop keeps accepting."""
    while True:
        batch = [await queue.get()]
        if queue.qsize() < batch_size - 1:
            await asyncio.sleep(wait_s)
        while len(batch) < batch_size and not queue.empty():
            batch.append(queue.get_nowait())
        try:
            rewards = await asyncio.to_thread(reward, [item for item, _ in batch])
        except Exception as e:  # e.g. out of memory: these requests fail, the server keeps serving
            logger.exception("reward forward failed")
            rewards = [e] * len(batch)
        for (_, future), r in zip(batch, rewards):
            if future.done():  # its client has gone
                continue
            if isinstance(r, Exception):
                future.set_exception(r)
            else:
                future.set_result(r)


def build_app(
    reward: DittoReward, batch_size: int = 32, batch_wait_ms: float = 5.0, mix: list[tuple[str, float]] = ()
) -> FastAPI:
    """The FastAPI app. `mix`: (url, weight) of other reward servers whose rewards are added, weighted."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.queue = asyncio.Queue()  # ((prompt ids, response ids), future of its reward)
        app.state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180))
        task = asyncio.create_task(_batch_forever(reward, app.state.queue, batch_size, batch_wait_ms / 1000))
        yield
        task.cancel()
        await app.state.session.close()

    app = FastAPI(lifespan=lifespan)

    async def mixed_rewards(url: str, payload: dict) -> list[float]:
        n = len(payload["query"])
        if n == 0:  # nothing to ask
            return []
        try:
            async with app.state.session.post(url, json=payload) as answer:
                text = await answer.text()
                if answer.status != 200:
                    raise HTTPException(502, f"--mix {url} answered {answer.status}: {text[:500]}")
                rewards = json.loads(text)["rewards"]
                if not isinstance(rewards, list) or len(rewards) != n:
                    raise ValueError(f"{str(rewards)[:200]} for {n} queries")
                return [float(r) for r in rewards]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            raise HTTPException(502, f"--mix {url} failed: {type(e).__name__}: {e}") from e

    # Refused unread: a body over what QUERIES_PER_REQUEST queries of --data.max_len tokens (and their prompts) can
    # take in JSON. Its decoding and tokenization would hold every other client up (10 MB: seconds).
    limit = QUERIES_PER_REQUEST * 2 * reward.max_len * JSON_BYTES_PER_TOKEN

    def decode(body: bytes) -> tuple[list[str], list[str], list, list[tuple[list[int], list[int]]]]:
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ValueError(f"the body is not valid JSON ({e})") from e
        queries, prompts, labels = _parse(data)
        return queries, prompts, labels, reward.tokenize(queries, prompts)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        body = bytearray()
        if size <= limit:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    break
        if max(size, len(body)) > limit:
            message = (
                f"the body is over {limit} bytes, the most {QUERIES_PER_REQUEST} queries of --data.max_len "
                f"{reward.max_len} tokens can take; send fewer queries per request, or restart the server with a "
                "larger --data.max_len"
            )
            logger.warning("request refused: %s", message)
            raise HTTPException(413, message)
        try:  # in a thread: the event loop keeps answering other clients meanwhile
            queries, prompts, labels, items = await asyncio.to_thread(decode, bytes(body))
        except ValueError as e:  # OpenRLHF's client logs only the status code: say why here too
            logger.warning("bad request: %s", e)
            raise HTTPException(400, str(e)) from e
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            app.state.queue.put_nowait((item, future))
        payload = {"query": queries, "prompts": prompts, "labels": labels}
        try:
            ditto, *others = await asyncio.gather(
                asyncio.gather(*futures), *(mixed_rewards(url, payload) for url, _ in mix)
            )
        except HTTPException:
            raise
        except Exception as e:
            raise HTTPException(500, f"scoring failed: {type(e).__name__}: {e}") from e
        rewards = list(ditto)
        extra_logs = {"ditto_reward": list(ditto)}
        for i, ((_, weight), other) in enumerate(zip(mix, others)):
            rewards = [r + weight * o for r, o in zip(rewards, other)]
            extra_logs[f"mix{i}_reward"] = other
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:  # answered 200 with a bare NaN (not JSON), which Python clients read and train on
            message = (
                f"the reward of query {bad[0]} is {rewards[bad[0]]} ({len(bad)} of {len(rewards)} not finite): the "
                "policy, its reference or a --mix server gives NaN or inf (broken weights, an overflow in half "
                "precision)"
            )
            logger.error("%s", message)
            raise HTTPException(500, message)
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}

    return app


def serve(args: SimpleNamespace) -> None:
    """`openrlhf-ditto serve-reward`: load the models, then serve until interrupted."""
    try:  # before the models load: uvicorn would find the port taken only after
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    reward = load_reward(args)
    models = "one model, adapter on/off" if reward.reference is None else "policy and reference models"
    mixed = "".join(f" + {w} x {url}" for url, w in args.mix)
    print(
        f"DITTO reward: beta {reward.beta}, {models} on {reward.device}, batches of up to {args.batch_size} "
        f"queries{mixed}; POST http://{args.host}:{args.port}/get_reward",
        flush=True,
    )
    app = build_app(reward, args.batch_size, args.batch_wait_ms, args.mix)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
