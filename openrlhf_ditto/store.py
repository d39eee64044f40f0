"""The sample store: demos, each iteration's policy samples and any external preference pairs, with their cached
reference log-probs.

The reference policy is frozen, so a response's reference log-prob is computed once, when it enters the store,
and training never runs the reference again. Samples are kept per iteration and per prompt, so the pair sampler
reaches any (iteration, prompt) group in O(1) however long the run. External pairs (--ditto.extra_pairs) have
prompts of their own, which the policy never samples from.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from openrlhf_ditto.demos import Demo

DEMO = -1  # the iteration of a demo response
EXTERNAL = -2  # the iteration of a response of an external preference pair


@dataclass
class Response:
    prompt: int  # index into SampleStore.prompts (SampleStore.external_prompts for an external pair's)
    ids: torch.Tensor  # response token ids (int64, 1-D); an EOS ends it unless truncated
    ref_logp: float  # sum of the frozen reference's log-probs over the response tokens
    truncated: bool
    iteration: int  # DEMO for a demonstration, EXTERNAL for an external pair's, else the iteration t of pi_t


class SampleStore:
    def __init__(self, prompts: list[list[int]], demos: list[Response]):
        self.prompts = [torch.tensor(p, dtype=torch.long) for p in prompts]
        self.demos = demos
        self.demos_by_prompt: list[list[Response]] = [[] for _ in prompts]
        for demo in demos:
            self.demos_by_prompt[demo.prompt].append(demo)
        self.iterations: list[list[list[Response]]] = []  # [t][prompt] -> samples of pi_t
        self.external_prompts: list[torch.Tensor] = []
        self.external: list[tuple[Response, Response]] = []  # (chosen, rejected)
        self._written: set[tuple[Path, str]] = set()  # (folder, file name): that folder's file holds ours

    @classmethod
    def from_demos(cls, prompt_ids: list[list[int]], response_ids: list[list[int]], truncated: list[bool]):
        """Group demos by prompt (several demos may share one prompt); reference log-probs are filled in later."""
        index: dict[tuple[int, ...], int] = {}
        demos = []
        for p, r, t in zip(prompt_ids, response_ids, truncated):
            k = index.setdefault(tuple(p), len(index))
            demos.append(Response(k, torch.tensor(r, dtype=torch.long), float("nan"), t, DEMO))
        return cls([list(p) for p in index], demos)

    def add_external(self, pairs: list[tuple[Demo, Demo]]) -> None:
        """External preference pairs (chosen, rejected), grouped by prompt as demos are."""
        index: dict[tuple[int, ...], int] = {}
        for chosen, rejected in pairs:
            k = index.setdefault(tuple(chosen.prompt_ids), len(index))
            chosen_r, rejected_r = (
                Response(k, torch.tensor(d.response_ids, dtype=torch.long), float("nan"), d.truncated, EXTERNAL)
                for d in (chosen, rejected)
            )
            self.external.append((chosen_r, rejected_r))
        self.external_prompts = [torch.tensor(p, dtype=torch.long) for p in index]

    def prompt_of(self, response: Response) -> torch.Tensor:
        return (self.external_prompts if response.iteration == EXTERNAL else self.prompts)[response.prompt]

    @property
    def num_iterations(self) -> int:
        return len(self.iterations)

    def add_iteration(self, samples: list[Response]) -> None:
        by_prompt: list[list[Response]] = [[] for _ in self.prompts]
        for s in samples:
            assert s.iteration == self.num_iterations, "samples must belong to the next iteration"
            by_prompt[s.prompt].append(s)
        if not all(by_prompt):
            raise ValueError("an iteration needs at least one sample for every prompt (samples per prompt >= 1)")
        self.iterations.append(by_prompt)

    # Each iteration goes in a file of its own, written once by this store; a saved store only grows. A file this
    # store did not write or load (a crashed run's iteration, re-sampled after resuming) is replaced. The external
    # pairs, possibly a large dataset, are written once too.
    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "demos.json", {"prompts": [p.tolist() for p in self.prompts], "demos": _dump(self.demos)})
        where = folder.resolve()
        for t, by_prompt in enumerate(self.iterations):
            name = f"iteration_{t:05d}.json"
            if (where, name) not in self._written:
                _write_json(folder / name, _dump([s for group in by_prompt for s in group]))
                self._written.add((where, name))
        if self.external and (where, "external.json") not in self._written:
            prompts = [p.tolist() for p in self.external_prompts]
            _write_json(
                folder / "external.json", {"prompts": prompts, "pairs": _dump([r for p in self.external for r in p])}
            )
            self._written.add((where, "external.json"))

    @classmethod
    def load(cls, folder: str | os.PathLike, num_iterations: int | None = None) -> "SampleStore":
        folder = Path(folder)
        head = read_json(folder / "demos.json")
        store = cls(head["prompts"], _parse(head["demos"]))
        if (folder / "external.json").exists():
            external = read_json(folder / "external.json")
            store.external_prompts = [torch.tensor(p, dtype=torch.long) for p in external["prompts"]]
            responses = _parse(external["pairs"])
            store.external = list(zip(responses[::2], responses[1::2]))
            store._written.add((folder.resolve(), "external.json"))
        t = 0
        while (folder / f"iteration_{t:05d}.json").exists() and (num_iterations is None or t < num_iterations):
            store.add_iteration(_parse(read_json(folder / f"iteration_{t:05d}.json")))
            store._written.add((folder.resolve(), f"iteration_{t:05d}.json"))
            t += 1
        if num_iterations is not None and t < num_iterations:
            raise FileNotFoundError(f"{folder} holds {t} iterations of samples, the checkpoint needs {num_iterations}")
        return store


def _dump(responses: list[Response]) -> list[dict]:
    # Python floats print in JSON with repr, which reads back bit-identically.
    return [
        {"prompt": r.prompt, "ids": r.ids.tolist(), "ref_logp": r.ref_logp, "truncated": r.truncated, "t": r.iteration}
        for r in responses
    ]


def _parse(rows: list[dict]) -> list[Response]:
    return [
        Response(r["prompt"], torch.tensor(r["ids"], dtype=torch.long), r["ref_logp"], r["truncated"], r["t"])
        for r in rows
    ]


def read_json(path: Path, lines: bool = False):
    """A JSON (or, with `lines`, JSON Lines) file that a run wrote; a damaged one is refused naming it."""
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}): it was changed or cut after the run wrote it") from None


def _write_json(path: Path, obj) -> None:
    """Write then rename, so a crash never leaves a half-written file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
