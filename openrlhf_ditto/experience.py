"""DittoExperienceMaker: demos plus each iteration's rollouts in, scored samples and ranked pair batches out.

It knows nothing of where rollouts and reference log-probs come from (HF generate or vLLM, a local model or a
Ray reference group): the backend hands it token ids and a function that scores sequences with the reference.
"""

from collections.abc import Callable

import torch

from openrlhf_ditto.pairs import PairBatch, PairSampler, SequenceBatch, collate, collate_pairs
from openrlhf_ditto.store import Response, SampleStore

# micro-batches of sequences, and the run of each row -> per-row sums of the reference's log-probs over the response
# tokens, all rows in order
RefLogpFn = Callable[[list[SequenceBatch], list[list[str]]], torch.Tensor]


class DittoExperienceMaker:
    def __init__(
        self,
        store: SampleStore,
        sampler: PairSampler,
        ref_logps_fn: RefLogpFn,
        pad_token_id: int,
        eos_token_ids: set[int],
        micro_batch_size: int = 8,
        run: str = "",
    ):
        self.store = store
        self.sampler = sampler
        self.ref_logps_fn = ref_logps_fn
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.micro_batch_size = micro_batch_size
        self.run = run  # whose reference scores this store (one of a backend's runs)

    def unscored_inputs(self) -> list[Response]:
        """The demos and external pair responses without a reference log-prob yet (a resumed store has them)."""
        inputs = self.store.demos + [r for pair in self.store.external for r in pair]
        return [r for r in inputs if r.ref_logp != r.ref_logp]  # NaN: not scored yet

    def score_inputs(self) -> None:
        """Reference log-probs of the demos and the external pairs (once per run)."""
        score([(self, self.unscored_inputs())])

    def samples(self, rollouts: list[list[list[int]]]) -> list[Response]:
        """One iteration's rollouts as responses to score: rollouts[p] holds the M sampled responses (token ids) of
        prompt p. A response that does not end with an EOS hit the token limit: it is kept, flagged truncated."""
        if len(rollouts) != len(self.store.prompts):
            raise ValueError(f"got rollouts for {len(rollouts)} prompts, the store has {len(self.store.prompts)}")
        if any(len(ids) == 0 for group in rollouts for ids in group):
            raise ValueError("a rollout has no tokens; the generator must return at least one token per sample")
        t = self.store.num_iterations
        return [
            Response(p, torch.tensor(ids, dtype=torch.long), float("nan"), ids[-1] not in self.eos_token_ids, t)
            for p, group in enumerate(rollouts)
            for ids in group
        ]

    def add_samples(self, samples: list[Response]) -> dict[str, float]:
        """Store one iteration's scored samples; returns their statistics."""
        self.store.add_iteration(samples)
        lengths = torch.tensor([len(s.ids) for s in samples], dtype=torch.float32)
        return {
            "samples/count": len(samples),
            "samples/mean_length": lengths.mean().item(),
            "samples/max_length": lengths.max().item(),
            "samples/truncated_rate": sum(s.truncated for s in samples) / len(samples),
            "samples/mean_ref_logp": sum(s.ref_logp for s in samples) / len(samples),
        }

    def make_experience(self, rollouts: list[list[list[int]]]) -> dict[str, float]:
        """Score and store one iteration's rollouts (`samples`); returns their statistics."""
        samples = self.samples(rollouts)
        score([(self, samples)])
        return self.add_samples(samples)

    def pair_batch(self, batch_size: int) -> PairBatch:
        """Draw `batch_size` ranked pairs for the newest iteration and collate them into one tensor batch."""
        return collate_pairs(self.sampler.sample(batch_size), self.store, self.pad_token_id)


def score(groups: list[tuple[DittoExperienceMaker, list[Response]]]) -> None:
    """Fill in reference log-probs, once per response, of several runs' responses (their makers share one backend):
    micro-batches across runs (longest first, so each pads little), all handed to the reference in one call, which
    batches every run's rows together, and a distributed reference spreads over its ranks."""
    rows = [(maker, r) for maker, responses in groups for r in responses]
    if not rows:
        return
    first = groups[0][0]
    order = sorted(rows, key=lambda x: len(x[1].ids) + len(x[0].store.prompt_of(x[1])), reverse=True)
    size = first.micro_batch_size
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    batches = [
        collate([m.store.prompt_of(r) for m, r in c], [r.ids for _, r in c], first.pad_token_id) for c in chunks
    ]
    runs = [[m.run for m, _ in c] for c in chunks]
    for (_, r), logp in zip(order, first.ref_logps_fn(batches, runs).tolist(), strict=True):
        r.ref_logp = logp
