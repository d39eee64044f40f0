"""DittoExperienceMaker: demos plus each iteration's rollouts in, scored samples and ranked pair batches out.

It knows nothing of where rollouts and reference log-probs come from (HF generate or vLLM, a local model or a
Ray reference group): the backend hands it token ids and a function that scores sequences with the reference.
"""

from collections.abc import Callable

import torch

from openrlhf_ditto.pairs import PairBatch, PairSampler, SequenceBatch, collate, collate_pairs
from openrlhf_ditto.store import Response, SampleStore

# micro-batches of sequences -> per-row sums of the reference's log-probs over the response tokens, all rows in order
RefLogpFn = Callable[[list[SequenceBatch]], torch.Tensor]


class DittoExperienceMaker:
    def __init__(
        self,
        store: SampleStore,
        sampler: PairSampler,
        ref_logps_fn: RefLogpFn,
        pad_token_id: int,
        eos_token_ids: set[int],
        micro_batch_size: int = 8,
    ):
        self.store = store
        self.sampler = sampler
        self.ref_logps_fn = ref_logps_fn
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.micro_batch_size = micro_batch_size

    def _score(self, responses: list[Response]) -> None:
        """Fill in reference log-probs, once per response: micro-batches (longest first, so each pads little), all
        handed to the reference in one call, which a distributed reference spreads over its ranks."""
        order = sorted(responses, key=lambda r: len(r.ids) + len(self.store.prompt_of(r)), reverse=True)
        if not order:
            return
        chunks = [order[i : i + self.micro_batch_size] for i in range(0, len(order), self.micro_batch_size)]
        pad = self.pad_token_id
        batches = [collate([self.store.prompt_of(r) for r in c], [r.ids for r in c], pad) for c in chunks]
        for r, logp in zip(order, self.ref_logps_fn(batches).tolist(), strict=True):
            r.ref_logp = logp

    def score_inputs(self) -> None:
        """Reference log-probs of the demos and the external pairs (once per run; a resumed store has them)."""
        inputs = self.store.demos + [r for pair in self.store.external for r in pair]
        self._score([r for r in inputs if r.ref_logp != r.ref_logp])  # NaN: not scored yet

    def make_experience(self, rollouts: list[list[list[int]]]) -> dict[str, float]:
        """Store one iteration's rollouts: rollouts[p] holds the M sampled responses (token ids) of prompt p.

        A response that does not end with an EOS hit the token limit: it is kept, flagged truncated.
        Returns statistics of the iteration's samples.
        """
        if len(rollouts) != len(self.store.prompts):
            raise ValueError(f"got rollouts for {len(rollouts)} prompts, the store has {len(self.store.prompts)}")
        if any(len(ids) == 0 for group in rollouts for ids in group):
            raise ValueError("a rollout has no tokens; the generator must return at least one token per sample")
        t = self.store.num_iterations
        samples = [
            Response(p, torch.tensor(ids, dtype=torch.long), float("nan"), ids[-1] not in self.eos_token_ids, t)
            for p, group in enumerate(rollouts)
            for ids in group
        ]
        self._score(samples)
        self.store.add_iteration(samples)
        lengths = torch.tensor([len(s.ids) for s in samples], dtype=torch.float32)
        return {
            "samples/count": len(samples),
            "samples/mean_length": lengths.mean().item(),
            "samples/max_length": lengths.max().item(),
            "samples/truncated_rate": sum(s.truncated for s in samples) / len(samples),
            "samples/mean_ref_logp": sum(s.ref_logp for s in samples) / len(samples),
        }

    def pair_batch(self, batch_size: int) -> PairBatch:
        """Draw `batch_size` ranked pairs for the newest iteration and collate them into one tensor batch."""
        return collate_pairs(self.sampler.sample(batch_size), self.store, self.pad_token_id)
