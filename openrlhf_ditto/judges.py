"""The pairwise judges of `openrlhf-ditto eval`: which of two outputs reads more like the user's own writing.

The openai and local judges get the paper's prompt (Shaikh et al., appendix "GPT-eval prompts"): the user's
held-out response to the prompt as the author's writing, the two outputs as A and B, and a request for the answer
as JSON. A judgment is one request: (reference, first output as A, second output as B). Its result is a dict with
"status" ("ok", "unparsable": the judge answered something else, "failed": no answer after the retries), "answer"
("A", "B" or None) and what the judge said ("raw", or the local judge's "p_a" and "p_b", or the style judge's
"sim_a" and "sim_b"). The style judge asks no model: it compares surface style only (`judge_style`).
"""

import asyncio
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import torch

SYSTEM = "You are an impartial evaluator."
PROMPT = """You are an impartial evaluator. Below is a sample of a human author's writing and two options.
### HUMAN AUTHOR'S WRITING:
{reference}
### OUTPUT A:
{a}
### OUTPUT B:
{b}
### Task
Which option was written by the human author based on similarity to the HUMAN AUTHOR'S WRITING above? Respond only \
with a JSON of the following format:
{{
  "answer": "<The option most similar to the HUMAN AUTHOR'S WRITING; either A or B>"
}}
ALWAYS REMAIN IMPARTIAL WHEN EVALUATING OUTPUTS."""
ANSWER = re.compile(r'"answer"\s*:\s*"\s*(?:output\s+|option\s+)?([AB])\b', re.IGNORECASE)
RETRY_STATUS = {408, 409, 429} | set(range(500, 600))

Judgment = tuple[str, str, str]  # (reference, output shown as A, output shown as B)
OnResult = Callable[[int, dict], None]  # called with the judgment's index and its result, as each one completes


def messages(judgment: Judgment) -> list[dict]:
    reference, a, b = judgment
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPT.format(reference=reference, a=a, b=b)},
    ]


def parse(content: str) -> dict:
    found = ANSWER.search(content)
    if found is None:
        return {"status": "unparsable", "answer": None, "raw": content}
    return {"status": "ok", "answer": found.group(1).upper(), "raw": content}


async def judge_openai(
    judgments: list[Judgment],
    on_result: OnResult,
    url: str,
    model: str,
    api_key: str | None,
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 4,
) -> None:
    """Ask an OpenAI-compatible chat endpoint (`url` ends in /v1) for every judgment, at most `concurrency` at a
    time, temperature 0. A timeout, a connection error, a 408/409/429/5xx answer or a body that is not a chat
    completion is retried `retries` times, waiting 1, 2, 4, ... s; then the judgment is "failed"."""
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": model, "messages": messages(judgments[i]), "temperature": 0, "max_tokens": 100}
        result, error, refused = None, "", False
        async with gate:
            for attempt in range(retries + 1):
                if attempt:
                    await asyncio.sleep(2 ** (attempt - 1))
                refused = False  # only a connection refused on the last try means there is no server
                try:
                    async with session.post(endpoint, json=body, headers=headers) as answer:
                        status, text = answer.status, await answer.text()
                    if status == 200:
                        result = parse(_content(text))  # ValueError if the body is not a chat completion: retried
                        break
                    error = f"HTTP {status}: {text[:200]}"
                    if status not in RETRY_STATUS:  # a bad request, key or model name: asking again gives the same
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    error = f"{type(e).__name__}: {e}".removesuffix(": ")
                    refused = isinstance(e, aiohttp.ClientConnectorError)
        if result is None and refused:  # no server there: every other judgment would wait out its retries too
            raise ValueError(
                f"--judge.url {url}: cannot connect ({error}, {attempt + 1} tries); start the judge's server or fix "
                "--judge.url, then run the same command again: the judgments received so far are kept"
            )
        on_result(i, result or {"status": "failed", "answer": None, "error": f"{error} ({attempt + 1} tries)"})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(one(session, i) for i in range(len(judgments))))


def _content(text: str) -> str:
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {text[:200]!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"not a chat completion: {text[:200]!r}")
    return content


@torch.no_grad()
def judge_local(judgments: list[Judgment], on_result: OnResult, model_path: str | Path, batch_size: int = 8) -> None:
    """Ask a local Hugging Face chat model: after the prompt and the start of the JSON answer ('{"answer": "'), the
    judge's answer is whichever of the tokens "A" and "B" is more likely. No generation, nothing to parse. The
    letters' ids are those that follow the context when context and letter are tokenized together: tokenized on its
    own, a SentencePiece tokenizer gives "A" as "▁A", another token. A template that refuses a system message
    (Mistral-v0.2, Gemma) gets the user message alone, which opens with the same line."""
    from jinja2 import TemplateError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_ditto.pairs import collate

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"--judge.model {model_path}: cannot load a tokenizer ({e}); --judge local takes a Hugging Face chat "
            "model folder"
        ) from e
    if not tokenizer.chat_template:
        raise ValueError(f"--judge.model {model_path} has no chat template; --judge local needs a chat model")
    if not judgments:
        return

    def context(judgment: Judgment) -> str:
        try:
            text = tokenizer.apply_chat_template(messages(judgment), tokenize=False, add_generation_prompt=True)
        except TemplateError:  # "System role not supported"
            text = tokenizer.apply_chat_template(messages(judgment)[1:], tokenize=False, add_generation_prompt=True)
        return text + '{"answer": "'

    texts = [context(j) for j in judgments]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    choices = []
    for letter in "AB":
        with_letter = tokenizer(texts[0] + letter, add_special_tokens=False)["input_ids"]
        if with_letter[:-1] != ids[0]:
            raise ValueError(
                f"--judge.model {model_path}: its tokenizer does not give {letter!r} as one token after "
                f'\'{{"answer": "\' ({with_letter[len(ids[0]) - 1 :]} where {ids[0][-1:]} was), so its answer '
                "cannot be read from one forward pass; choose another judge"
            )
        choices.append(with_letter[-1])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [torch.tensor(x) for x in ids]
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        batch = collate(rows, [x[:0] for x in rows], pad).to(device)
        mask = batch.attention_mask
        logits = model(
            batch.sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1
        ).logits[:, -1]
        probs = logits.float().softmax(-1)[:, choices].cpu().tolist()
        for offset, (p_a, p_b) in enumerate(probs):
            if math.isfinite(p_a + p_b):
                result = {"status": "ok", "answer": "A" if p_a >= p_b else "B", "p_a": p_a, "p_b": p_b}
            else:  # a broken judge (NaN logits, e.g. a half-precision overflow) decides nothing
                result = {"status": "failed", "answer": None, "error": f"p(A) {p_a}, p(B) {p_b}"}
            on_result(start + offset, result)


def judge_style(judgments: list[Judgment], on_result: OnResult, writing: list[str]) -> None:
    """Offline and deterministic: the output whose surface style is closer to the user's own writing (`writing`,
    the run's demos, plus the judgment's reference) wins. Each text becomes TF-IDF weighted character 1-4-grams
    (spelling, punctuation, capitals, word pieces) and words, fitted on that writing and the two outputs; the
    winner has the higher cosine similarity to the mean of the writing's vectors. It sees style, not content or
    quality. Each judgment depends on its own texts only (the cache is keyed by them); a tie answers "A", which
    the other order turns into a split."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity
    from sklearn.pipeline import FeatureUnion

    for i, (reference, a, b) in enumerate(judgments):
        features = FeatureUnion(
            [
                ("chars", TfidfVectorizer(analyzer="char", ngram_range=(1, 4), lowercase=False, sublinear_tf=True)),
                ("words", TfidfVectorizer(analyzer="word", sublinear_tf=True)),
            ]
        )
        vectors = features.fit_transform([*writing, reference, a, b])
        profile = np.asarray(vectors[:-2].mean(axis=0))
        sim_a, sim_b = cosine_similarity(vectors[-2:], profile)[:, 0].tolist()
        on_result(i, {"status": "ok", "answer": "A" if sim_a >= sim_b else "B", "sim_a": sim_a, "sim_b": sim_b})
