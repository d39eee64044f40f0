"""`openrlhf-ditto eval`: did DITTO work? The paper's pairwise win rates on held-out prompts of the same user.

Conditions: zero-shot (the run's base model), few-shot (the base model with the run's demos in context), sft (the
run's pi_0, reference/), ditto (its final/) and any NAME=HF_FOLDER. Each samples N responses per held-out prompt
with the batched sampler (temperature 1, as the paper), saved in OUT/generations/NAME.jsonl before any judging.
Then every pair of conditions is judged on every prompt, sample i against sample i, in both orders (A and B
swapped) to cancel the judge's position bias (`judges.py`). A comparison counts only when both orders were
answered; it scores 1 (won both), 0.5 (split) or 0 for the first condition. The win rate of a row over a column is
its mean score; its 95% interval is a bootstrap over held-out prompts (the samples of one prompt are not
independent).

Nothing is done twice: generations are reused while the model, the rendered prompt and the sampling settings are
the same, and each judgment is appended to OUT/judgments.jsonl as it arrives, keyed by (judge, reference, A, B).
A killed eval resumes where it stopped; a new condition costs only its own pairs. Failed judgments (no answer)
are asked again by the next run; unparsable ones are answers, kept.
"""

import asyncio
import copy
import gc
import hashlib
import itertools
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.backends.local import rollout_engine
from openrlhf_ditto.backends.sampling import sample_responses
from openrlhf_ditto.demos import load_demos, read_records
from openrlhf_ditto.judges import judge_local, judge_openai, judge_style
from openrlhf_ditto.models import check_causal_lm, check_weights, eos_token_ids, param_dtype
from openrlhf_ditto.runfolder import RunStopped, read_run_config, write_atomic

BUILT_IN = ("zero-shot", "few-shot", "sft", "ditto")
OPENAI_URL = "https://api.openai.com/v1"


def conditions(entries: list[str] | None, run: Path, base: str) -> dict[str, str]:
    """--conditions (default: the four built in) as {name: model folder}; few-shot's model is the base model."""
    models = {}
    for entry in entries or BUILT_IN:
        name, given, folder = entry.partition("=")
        if not given:
            if name not in BUILT_IN:
                raise ValueError(
                    f"--conditions: unknown condition {entry!r}; use {', '.join(BUILT_IN)} or NAME=HF_FOLDER"
                )
            sub = {"sft": "reference", "ditto": "final"}.get(name)
            folder = str(run / sub) if sub else base
            if sub and not (run / sub).is_dir():
                raise FileNotFoundError(
                    f"--run {run} has no {sub}/ for the {name} condition: the run has not finished; finish it with "
                    f"`openrlhf-ditto train ... --resume`, or leave {name} out of --conditions"
                )
        elif not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"--conditions: {entry!r} is not NAME=HF_FOLDER (a name of letters, digits, . _ -)")
        elif not (Path(folder) / "config.json").is_file():
            raise ValueError(f"--conditions: {entry!r} is not NAME=HF_FOLDER: {folder} holds no config.json")
        else:
            check_causal_lm(folder, f"--conditions {name}:")
        if name in models:
            raise ValueError(f"--conditions: {name} is given twice")
        check_weights(folder, f"--conditions {name}:")
        models[name] = folder
    if len(models) < 2:
        raise ValueError(f"--conditions: {' '.join(entries)} is one condition; give at least two to compare")
    return models


def _conversation(record: dict, input_key: str, output_key: str) -> tuple[str | list[dict], str]:
    """A record's prompt (text, or chat messages) and response, as `load_demos` reads them (it checked them)."""
    if "messages" in record and input_key not in record:
        messages = record["messages"]
        last = max(j for j, m in enumerate(messages) if m.get("role") == "assistant")
        return messages[:last], messages[last]["content"]
    return record[input_key], record[output_key]


def few_shot_prompt(
    tokenizer, shots: list[tuple], prompt: str | list[dict], chat: bool, input_template: str | None
) -> str:
    """The prompt after the demos: as earlier turns of the chat, or each demo rendered, then its response."""
    if chat:
        messages = []
        for p, response in [*shots, (prompt, None)]:
            messages += p if isinstance(p, list) else [{"role": "user", "content": p}]
            messages += [{"role": "assistant", "content": response}] if response is not None else []
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    render = (input_template or "{}").format
    return "".join(f"{render(p)}{response}\n\n" for p, response in shots) + render(prompt)


def _render(
    args: SimpleNamespace, config: dict, records: list[dict], name: str, folder: str
) -> tuple[list[str], list[str]]:
    """The held-out prompts (`records`, read from --data.dataset) as condition `name` sees them, rendered with its
    own tokenizer, and the user's held-out responses."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--conditions: cannot load {name}'s tokenizer from {folder} ({e})") from e
    d = args.data
    rendering = dict(
        input_template=d.input_template,
        apply_chat_template=d.apply_chat_template,
        prompt_max_len=config["data"]["max_len"] - args.rollout.max_new_tokens,
        generate_max_len=args.rollout.max_new_tokens,
    )
    held_out = load_demos(d.dataset, tokenizer, input_key=d.input_key, output_key=d.output_key, **rendering)
    if name != "few-shot":
        return [h.prompt for h in held_out], [h.response for h in held_out]
    # the run's own demos, read with the run's keys; shown to the model as the held-out prompts are rendered
    run = config["data"]
    demos = read_records(run["dataset"], "few-shot: the run's demos (its --data.dataset)")[: args.few_shot.k]
    load_demos(run["dataset"], tokenizer, input_key=run["input_key"], output_key=run["output_key"], **rendering)
    shots = [_conversation(r, run["input_key"], run["output_key"]) for r in demos]
    prompts = []
    for record in records:
        prompt, _ = _conversation(record, d.input_key, d.output_key)
        chat = d.apply_chat_template or isinstance(prompt, list)
        prompts.append(few_shot_prompt(tokenizer, shots, prompt, chat, d.input_template))
    # the demos in context make these the longest prompts of the eval: they must fit the run's budget and the model
    budget, why = rendering["prompt_max_len"], f"the run's --data.max_len {config['data']['max_len']}"
    window = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    if window is not None and window - args.rollout.max_new_tokens < budget:
        budget, why = window - args.rollout.max_new_tokens, f"the model's context window of {window}"
    for i, text in enumerate(prompts):
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > budget:
            raise ValueError(
                f"few-shot: held-out prompt {i} with {len(shots)} demos in context is {length} tokens, over the "
                f"prompt budget of {budget} ({why} minus --rollout.max_new_tokens {args.rollout.max_new_tokens}); "
                "put fewer demos in context with --few_shot.k, or lower --rollout.max_new_tokens"
            )
    return prompts, [h.response for h in held_out]


def _generate(folder: str, prompts: list[str], sampling: dict, batch_size: int, gpu_memory_utilization) -> list[dict]:
    """N sampled responses per prompt (decoded, special tokens dropped), with whether each was cut at the budget."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = param_dtype(sampling["param_dtype"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if sampling["engine"] == "torch":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--conditions: cannot load the model {folder} ({e})") from e
    eos = eos_token_ids(folder, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    torch.manual_seed(sampling["seed"])  # each condition samples the same whichever others run with it
    n, max_new, temperature, top_p, top_k = (
        sampling[k] for k in ("n", "max_new_tokens", "temperature", "top_p", "top_k")
    )
    if sampling["engine"] == "vllm":
        from openrlhf_ditto.backends.vllm_engine import VLLMEngine

        share = gpu_memory_utilization or 0.1
        if device.type == "cuda":
            # vLLM refuses to start when its share exceeds what is free: whatever the previous condition's engine or
            # this process left cached is given back first, and the default share is at most what is free
            gc.collect()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            share = gpu_memory_utilization or min(0.9, free / total - 0.02)
        engine = VLLMEngine(folder, max(len(p) for p in ids) + max_new, sampling["seed"], share, dtype=dtype)
        try:
            groups = engine.generate(ids, n, eos, max_new, temperature, top_p, top_k)
        finally:
            engine.close()
    else:
        groups = []
        for start in range(0, len(ids), batch_size):
            groups += sample_responses(
                model, ids[start : start + batch_size], n, pad, eos, max_new, temperature, top_p, top_k
            )
        del model
        gc.collect()
    return [
        {
            "samples": [tokenizer.decode(r, skip_special_tokens=True).strip() for r in group],
            "truncated": [not r or r[-1] not in eos for r in group],
        }
        for group in groups
    ]


def _read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSONL file we wrote; a line cut by a kill (the last one) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _interval(per_prompt: list[list[float]], draws: int = 2000) -> tuple[float, float, float, int] | None:
    """Mean score, its 95% bootstrap interval (resampling prompts with their comparisons), and the count."""
    groups = [g for g in per_prompt if g]
    if not groups:
        return None
    sums, counts = np.array([sum(g) for g in groups]), np.array([len(g) for g in groups])
    picks = np.random.default_rng(0).integers(len(groups), size=(draws, len(groups)))
    low, high = np.percentile(sums[picks].sum(1) / counts[picks].sum(1), [2.5, 97.5])
    return float(sums.sum() / counts.sum()), float(low), float(high), int(counts.sum())


def _judge_settings(args: SimpleNamespace) -> tuple[str, str | None]:
    """The judge's identity in the cache, and the OpenAI API key (None for the local judge)."""
    j = args.judge
    if j.kind == "style":
        return "style", None
    if j.kind == "local":
        if j.model is None or not Path(j.model).is_dir():
            raise FileNotFoundError(
                f"--judge local needs --judge.model: a local Hugging Face chat model folder (got {j.model})"
            )
        check_causal_lm(j.model, "--judge.model")
        check_weights(j.model, "--judge.model")
        return f"local {Path(j.model).resolve()}", None
    j.model, j.url = j.model or "gpt-4o", (j.url or OPENAI_URL).rstrip("/")
    key = os.environ.get("OPENAI_API_KEY")
    if j.url == OPENAI_URL and not key:
        raise ValueError(
            f"--judge openai at {OPENAI_URL} needs OPENAI_API_KEY in the environment; or give --judge.url of another "
            "OpenAI-compatible server, or --judge local --judge.model HF_FOLDER"
        )
    return f"openai {j.url} {j.model}", key


def evaluate(args: SimpleNamespace) -> Path:
    """Run `openrlhf-ditto eval` (flags as parsed by cli/main.py); returns the report's path."""
    run = Path(args.run)
    if not (run / "run_config.json").exists():
        raise FileNotFoundError(
            f"--run {run} holds no DITTO run (no run_config.json); give the --ckpt.output_dir of "
            "`openrlhf-ditto train`"
        )
    config = read_run_config(run)
    for key in ("input_key", "output_key", "input_template", "apply_chat_template"):  # default: the run's rendering
        if getattr(args.data, key) is None:
            setattr(args.data, key, config["data"][key])
    r = args.rollout
    r.max_new_tokens = r.max_new_tokens or config["rollout"]["max_new_tokens"]
    if r.max_new_tokens >= config["data"]["max_len"]:
        raise ValueError(
            f"--rollout.max_new_tokens {r.max_new_tokens} leaves no room for the prompt in the run's --data.max_len "
            f"{config['data']['max_len']}; give fewer"
        )
    judge_id, api_key = _judge_settings(args)
    writing = None  # the style judge's profile of the user (with each judgment's reference)
    if args.judge.kind == "style":
        if args.judge.profile == "heldout":  # what SFT never saw: reproducing the demos earns nothing by itself
            held_out = read_records(args.data.dataset, "--data.dataset (held-out)")
            writing = [_conversation(r, args.data.input_key, args.data.output_key)[1] for r in held_out]
        else:
            run_data = config["data"]
            demos = read_records(run_data["dataset"], "--judge style: the run's demos (its --data.dataset)")
            writing = [_conversation(r, run_data["input_key"], run_data["output_key"])[1] for r in demos]
        judge_id = f"style v1 {hashlib.sha256(json.dumps(writing).encode()).hexdigest()[:16]}"
    models = conditions(args.conditions, run, config["actor"]["model_name_or_path"])
    # every prompt rendered and checked before any model is loaded: a bad file stops the eval at once
    records = read_records(args.data.dataset, "--data.dataset (held-out)")
    rendered = {name: _render(args, config, records, name, folder) for name, folder in models.items()}
    out = Path(args.output_dir or run / "eval")
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "generations").is_dir()):
        raise ValueError(
            f"--output_dir {out} is a file or a folder of other files; give an empty folder, or an earlier eval's "
            "to continue it"
        )
    try:
        (out / "generations").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write --output_dir {out} ({e})") from None

    sampling = dict(
        n=r.n_samples_per_prompt,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        seed=args.seed,
        engine=rollout_engine(r.engine),
        param_dtype=args.ds.param_dtype,
    )
    started = time.perf_counter()
    generations = _generations(
        out / "generations", models, rendered, sampling, r.batch_size, args.vllm.gpu_memory_utilization
    )
    generation_s = time.perf_counter() - started

    # every pair of conditions on every prompt, sample i against sample i, in both orders
    references = next(iter(rendered.values()))[1]
    requests, slots = {}, []
    for a, b in itertools.combinations(models, 2):
        for p, i in itertools.product(range(len(references)), range(r.n_samples_per_prompt)):
            keys = []
            for first, second in ((a, b), (b, a)):
                judgment = (references[p], generations[first][p]["samples"][i], generations[second][p]["samples"][i])
                key = hashlib.sha256(json.dumps([judge_id, *judgment]).encode()).hexdigest()
                requests.setdefault(key, (judgment, {"prompt": p, "sample": i, "A": first, "B": second}))
                keys.append(key)
            slots.append((a, b, p, *keys))
    started = time.perf_counter()
    answers, asked = _judge(args, out / "judgments.jsonl", judge_id, api_key, requests, writing)
    judging_s = time.perf_counter() - started

    names, P = list(models), len(references)
    scores = {(a, b): [[] for _ in range(P)] for a, b in itertools.permutations(names, 2)}
    left_out = 0
    for a, b, p, first, second in slots:
        x, y = answers[first], answers[second]
        if x["status"] == y["status"] == "ok":
            score = ((x["answer"] == "A") + (y["answer"] == "B")) / 2
            scores[a, b][p].append(score)
            scores[b, a][p].append(1 - score)
        else:
            left_out += 1
    matrix = {a: {b: _interval(scores[a, b]) if a != b else None for b in names} for a in names}
    results = {
        "run": str(run),
        "held_out": str(args.data.dataset),
        "judge": judge_id,
        "conditions": models,
        "sampling": sampling,
        "matrix": matrix,
        "mean": {a: _mean([m[0] for m in matrix[a].values() if m]) for a in names},
        "per_prompt": [
            {c: _mean(sum((scores[c, o][p] for o in names if o != c), [])) for c in names} for p in range(P)
        ],
        "truncated": {c: _mean([t for g in generations[c] for t in g["truncated"]]) for c in names},
        "judgments": {"total": len(requests), "asked_now": asked, **Counter(answers[k]["status"] for k in requests)},
        "comparisons": {"total": len(slots), "left_out": left_out},
        "seconds": {"generation": generation_s, "judging": judging_s},
    }
    questions = []  # for the per-prompt table: the prompt's text, or its chat's last message
    for record in records:
        prompt, _ = _conversation(record, args.data.input_key, args.data.output_key)
        questions.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    errors = [answers[k].get("error") or answers[k].get("raw") for k in requests if answers[k]["status"] != "ok"]
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    _heatmap(names, matrix, out / "heatmap.png")
    report = _report(results, questions, errors)
    (out / "report.md").write_text(report)
    print(report.split("\n## Per prompt")[0])
    if left_out == len(slots) or "ditto" in names and not any(matrix["ditto"][b] for b in names if b != "ditto"):
        j = results["judgments"]
        raise RunStopped(
            f"no comparison{' of ditto' if left_out < len(slots) else ''} was judged: of {j['total']} judgments, "
            f"{j.get('failed', 0)} failed and {j.get('unparsable', 0)} were unparsable (the first: "
            f"{errors[0][:200]!r}), so the report has nothing to compare. Fix the judge or choose another "
            "(--judge.url, --judge.model) and run the same command again: failed judgments are asked again, "
            "unparsable answers are kept for this judge"
        )
    return out / "report.md"


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fingerprint(model: str) -> str:
    """A model folder's identity for the generation cache: the name, size and modification time of every file in
    it, since a run continued with --resume rewrites final/ under the same path. A Hub id stands for itself."""
    path = Path(model)
    if not path.is_dir():
        return model
    files = sorted(f for f in path.rglob("*") if f.is_file())
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _generations(
    folder: Path, models: dict[str, str], rendered: dict, sampling: dict, batch_size: int, gpu_memory_utilization
) -> dict[str, list[dict]]:
    """Each condition's saved generations, sampling those whose model files, prompts or settings changed."""
    generations, stale = {}, []
    weights = {name: _fingerprint(model) for name, model in models.items()}
    for name in models:
        saved = _read_jsonl(folder / f"{name}.jsonl")
        if [(g.get("weights"), g["prompt"], g["sampling"]) for g in saved] == [
            (weights[name], p, sampling) for p in rendered[name][0]
        ]:
            generations[name] = saved
        else:
            stale.append(name)
    for name in tqdm(stale, desc="generating"):
        rows = [
            {
                "index": i,
                "model": models[name],
                "weights": weights[name],
                "prompt": p,
                "sampling": sampling,
                "reference": ref,
                **row,
            }
            for i, (p, ref, row) in enumerate(
                zip(
                    *rendered[name],
                    _generate(models[name], rendered[name][0], sampling, batch_size, gpu_memory_utilization),
                )
            )
        ]
        tmp = folder / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        os.replace(tmp, folder / f"{name}.jsonl")
        generations[name] = rows
    return generations


def _judge(
    args: SimpleNamespace, cache_file: Path, judge_id: str, api_key: str | None, requests: dict, writing: list | None
) -> tuple[dict[str, dict], int]:
    """Every request's judgment: from the cache, or asked now and appended to it as it arrives. Returns them by
    key, and how many were asked now."""
    answers = {row["key"]: row for row in _read_jsonl(cache_file) if row["status"] != "failed"}
    todo = [key for key in requests if key not in answers]
    judgments = [requests[key][0] for key in todo]
    j = args.judge
    with open(cache_file, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"judging ({j.kind})") as bar:

        def on_result(i: int, result: dict) -> None:
            row = {"key": todo[i], "judge": judge_id, **requests[todo[i]][1], **result}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a killed eval keeps every judgment it received
            answers[todo[i]] = row
            bar.update()

        if j.kind == "openai":
            asyncio.run(
                judge_openai(judgments, on_result, j.url, j.model, api_key, j.concurrency, j.timeout, j.retries)
            )
        elif j.kind == "style":
            judge_style(judgments, on_result, writing)
        elif judgments:
            judge_local(judgments, on_result, j.model, j.batch_size)
    return answers, len(todo)


def _pct(cell) -> str:
    return "n/a" if cell is None else f"{100 * cell[0]:.1f}% [{100 * cell[1]:.0f}, {100 * cell[2]:.0f}]"


def _report(results: dict, questions: list[str], errors: list[str]) -> str:
    sampling = results["sampling"]
    names, matrix, j, c = list(results["conditions"]), results["matrix"], results["judgments"], results["comparisons"]
    lines = [
        "# DITTO eval",
        "",
        f"Run `{results['run']}`, held-out prompts `{results['held_out']}` ({len(questions)}), {sampling['n']} "
        f"samples per prompt and condition (temperature {sampling['temperature']}, top-k {sampling['top_k']}, up to "
        f"{sampling['max_new_tokens']} tokens, seed {sampling['seed']}), judge `{results['judge']}`. Each "
        "comparison is judged in both orders; win rates count a split as half; [95% interval], a bootstrap over "
        "prompts.",
        "",
    ]
    if results["judge"].startswith("style"):
        lines += [
            "The style judge measures surface style, not content: the output whose character n-grams and words "
            "(TF-IDF) are closer to the user's own writing (the run's demos and the held-out response) wins. It "
            "cannot tell whether an answer is right, relevant or good; for that use an LLM judge (`--judge openai` "
            "or `--judge local` with a 7B-class model).",
            "",
        ]
    if "ditto" in names:
        lines += ["| DITTO vs | DITTO wins | comparisons |", "| --- | --- | --- |"]
        lines += [
            f"| {b} | {_pct(matrix['ditto'][b])} | {matrix['ditto'][b][3] if matrix['ditto'][b] else 0} |"
            for b in names
            if b != "ditto"
        ]
        lines.append("")
    lines += [
        "Win rate of the row over the column (mean: the row's average over the others):",
        "",
        "| | " + " | ".join(names) + " | mean |",
    ]
    lines.append("| --- " * (len(names) + 2) + "|")
    for a in names:
        mean = results["mean"][a]
        cells = ["—" if a == b else _pct(matrix[a][b]) for b in names]
        lines.append(f"| **{a}** | " + " | ".join(cells) + f" | {'n/a' if mean is None else f'{100 * mean:.1f}%'} |")
    lines += [
        "",
        f"Judgments: {j['total']} ({j['total'] - j['asked_now']} from the cache, {j['asked_now']} asked now): "
        f"{j.get('ok', 0)} answered, {j.get('unparsable', 0)} unparsable, {j.get('failed', 0)} failed (asked again by "
        f"the next run). Comparisons: {c['total']}, {c['left_out']} left out because an order has no answer.",
    ]
    if errors:
        lines.append(f"The first judgment without an answer: {errors[0][:300]!r}")
    cut = ", ".join(f"{name} {100 * share:.0f}%" for name, share in results["truncated"].items())
    seconds = results["seconds"]
    lines += [
        f"Samples cut at {sampling['max_new_tokens']} tokens: {cut}. This run: generation "
        f"{seconds['generation']:.0f} s, judging {seconds['judging']:.0f} s.",
        "",
        "![win rates](heatmap.png)",
        "",
        "## Per prompt",
        "",
        "Each condition's win rate over all the others on that prompt.",
        "",
        "| prompt | " + " | ".join(names) + " |",
        "| --- " * (len(names) + 1) + "|",
    ]
    for question, row in zip(questions, results["per_prompt"]):
        cells = ["n/a" if row[n] is None else f"{100 * row[n]:.0f}%" for n in names]
        lines.append(f"| {question[:80].replace('|', '/')} | " + " | ".join(cells) + " |")
    lines += ["", "Generations: `generations/<condition>.jsonl`; every judgment: `judgments.jsonl`.", ""]
    return "\n".join(lines)


def _heatmap(names: list[str], matrix: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[np.nan if matrix[a][b] is None else matrix[a][b][0] for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(names), 1.5 + 0.9 * len(names)))
    image = ax.imshow(values, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, k), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(k, i, f"{100 * v:.0f}%", ha="center", va="center")
    ax.set_title("win rate of the row over the column")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def evaluate_users(args: SimpleNamespace) -> Path:
    """`openrlhf-ditto eval` of a multi-user run: `evaluate` of each user (their folder reads as a single-user run) on
    their own held-out prompts, then the paper's per-author table, a row per user and their average. --data.dataset is
    a folder of held-out files named by user id, or one file with the user column (--data.user_key, default: the
    run's). Returns the table's path (OUT/report.md; each user's own report is OUT/users/<id>/report.md)."""
    from openrlhf_ditto.users import DEMO_FILES

    run = Path(args.run)
    config = json.loads((run / "run_config.json").read_text())
    out = Path(args.output_dir or run / "eval")
    path, key = Path(args.data.dataset), args.data.user_key or config["data"]["user_key"]
    if key:
        held_out: dict[str, list[dict]] = {}
        for i, record in enumerate(read_records(path, "--data.dataset (held-out)")):
            if key not in record:
                raise ValueError(
                    f"--data.dataset (held-out): {path}, record {i}: no user key {key!r} (--data.user_key)"
                )
            held_out.setdefault(str(record[key]), []).append(record)
        files = {}
        for uid, records in held_out.items():
            files[uid] = out / "users" / uid / "held_out.jsonl"
            files[uid].parent.mkdir(parents=True, exist_ok=True)
            write_atomic(
                files[uid],
                "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records),
            )
    elif path.is_dir():
        files = {f.stem: f for f in sorted(path.iterdir()) if f.suffix.lower() in DEMO_FILES}
    else:
        raise ValueError(
            f"--data.dataset {path}: a multi-user run's held-out prompts are a folder of files named by user id, or "
            "one file with a user column (--data.user_key)"
        )
    finished = {p.parent.name for p in (run / "users").glob("*/final")}
    unknown = sorted(set(files) - finished)
    if unknown:
        raise ValueError(f"--data.dataset {path}: users {unknown} have no finished DITTO run in {run}/users")
    results = {}
    for uid in sorted(files):
        user = copy.deepcopy(args)
        user.run, user.data.dataset, user.output_dir = run / "users" / uid, files[uid], out / "users" / uid
        user.data.user_key = None
        print(f"\n# user {uid}")
        evaluate(user)
        results[uid] = json.loads((out / "users" / uid / "results.json").read_text())

    names = list(next(iter(results.values()))["conditions"])
    if "ditto" in names:  # the paper's table: DITTO's win rate against each baseline
        columns = [
            (f"DITTO vs {b}", lambda r, b=b: r["matrix"]["ditto"][b] and r["matrix"]["ditto"][b][0])
            for b in names
            if b != "ditto"
        ]
    else:  # each condition's mean win rate over the others
        columns = [(c, lambda r, c=c: r["mean"][c]) for c in names]
    rows = {uid: [cell(r) for _, cell in columns] for uid, r in results.items()}
    average = []
    for j in range(len(columns)):
        values = [row[j] for row in rows.values() if row[j] is not None]
        average.append(sum(values) / len(values) if values else None)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"# DITTO eval, many users: {run}",
        "",
        f"Held-out prompts `{path}`, judge `{next(iter(results.values()))['judge']}`; each user's own report (matrix, "
        "intervals, per prompt) is users/<id>/report.md.",
        "",
        "| user | " + " | ".join(name for name, _ in columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
        *(f"| {uid} | " + " | ".join(pct(x) for x in row) + " |" for uid, row in rows.items()),
        "| **average** | " + " | ".join(pct(x) for x in average) + " |",
    ]
    missing = sorted(finished - set(files))
    if missing:
        lines += ["", f"Not evaluated (no held-out prompts): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.md", text)
    table = {uid: dict(zip([name for name, _ in columns], row)) for uid, row in rows.items()}
    write_atomic(
        out / "results.json",
        json.dumps({"users": table, "average": dict(zip([n for n, _ in columns], average))}, indent=1),
    )
    print("\n" + text)
    return out / "report.md"
