"""Ranked pairs: demos beat every policy sample, later policies beat earlier ones.

Four kinds of pair (chosen > rejected), mixed in each batch by configurable fractions:
  online       a demo of prompt p  > a sample of p from the current iteration t
  replay       a demo of prompt p  > a sample of p from an earlier iteration j < t
  inter_model  a sample of p from iteration i > a sample of p from iteration j < i  (i <= t)
  external     a pair of the user's own preference data (--ditto.extra_pairs), chosen > rejected as given
At iteration 0 there is no earlier iteration: the replay and inter-model shares go to online pairs.
As in the official DITTO code, a batch's pairs of a kind are drawn uniformly from all pairs of that kind and without
replacement: a pair comes twice in a batch only once every pair of its kind is in it. A kind with few pairs (at most
`_ENUMERATED` per pair wanted) is enumerated; a larger one is drawn in O(1) a pair (a demo or a prompt, then the
iterations, then the samples), redrawing a pair already taken, so a batch costs the same however many iterations
and samples the store holds. The O(1) draws are uniform over pairs when every prompt has the same number of samples
in each iteration, as DITTO's rollouts give (M each).
"""

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from openrlhf_ditto.store import DEMO, Response, SampleStore

KINDS = ("online", "replay", "inter_model", "external")
ONLINE, REPLAY, INTER_MODEL, EXTERNAL = range(4)
_MAX_DRAWS = 32  # redraws for a pair already taken or of two identical responses before the slot is given up
_ENUMERATED = 2  # a kind with at most this many pairs per pair wanted is enumerated (else a redraw fails < 1/2)


@dataclass
class Pair:
    kind: int
    chosen: Response
    rejected: Response


def kind_counts(
    batch_size: int, fractions: tuple[float, ...], has_history: bool, owed: list[float] | None = None
) -> list[int]:
    """Pairs of each kind in a batch: fractions * batch_size, rounded so that over many batches the counts add up
    to the fractions. `owed` holds, per kind, the pairs that earlier batches' rounding owes it (updated in place):
    each slot goes to the kind owed most. Without it (one batch) this is the largest-remainder rounding; with it,
    24-pair batches at 0.7/0.2/0.1 hold 2 or 3 inter-model pairs, 10% over a run, instead of 2 (8.3%) forever.

    Without history (iteration 0) the replay and inter-model fractions are added to online. Three fractions have
    no external share.
    """
    f = list(fractions) + [0.0] * (len(KINDS) - len(fractions))
    if not has_history:
        f = [f[ONLINE] + f[REPLAY] + f[INTER_MODEL], 0.0, 0.0, f[EXTERNAL]]
    owed = [0.0] * len(KINDS) if owed is None else owed
    counts = [0] * len(KINDS)
    for k in range(len(KINDS)):
        owed[k] += f[k] * batch_size
    for _ in range(batch_size):
        k = max(range(len(KINDS)), key=owed.__getitem__)  # owed most; a kind of fraction 0 is never owed any
        counts[k] += 1
        owed[k] -= 1
    return counts


class PairSampler:
    def __init__(self, store: SampleStore, fractions: tuple[float, ...] = (0.7, 0.2, 0.1), seed: int = 0):
        if len(fractions) not in (3, 4) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"pair fractions (online, replay, inter_model[, external]) = {tuple(fractions)} must be >= 0 and sum "
                "to 1, e.g. 0.7 0.2 0.1 as in the paper"
            )
        if len(fractions) == 4 and fractions[EXTERNAL] > 0 and not store.external:
            raise ValueError("an external pair share needs external pairs in the store (--ditto.extra_pairs)")
        self.store = store
        self.fractions = tuple(fractions)
        self.rng = random.Random(seed)
        self.owed = [0.0] * len(KINDS)  # kind_counts' carry from batch to batch

    def sample(self, batch_size: int) -> list[Pair]:
        """Draw `batch_size` pairs for the newest iteration; a slot is dropped only when its kind has no pair of two
        distinct responses (a policy that reproduces its demo token for token), or every redraw of a large kind hit
        such a pair or one already taken."""
        t = self.store.num_iterations - 1
        if t < 0:
            raise RuntimeError("the store has no samples yet: add an iteration before drawing pairs")
        pairs = []
        for kind, count in enumerate(kind_counts(batch_size, self.fractions, t > 0, self.owed)):
            if count == 0:
                continue
            pool = list(itertools.islice(self._pool(kind, t), _ENUMERATED * count + 1))
            if len(pool) <= _ENUMERATED * count:
                pool = [pair for pair in pool if not _identical(pair)]
                while pool and count:  # the whole pool, shuffled, as often as the count needs
                    taken = self.rng.sample(pool, min(count, len(pool)))
                    pairs += taken
                    count -= len(taken)
                continue
            taken = set()
            for _ in range(count):
                for _ in range(_MAX_DRAWS):
                    pair = self._draw(kind, t)
                    key = (id(pair.chosen), id(pair.rejected))
                    if key not in taken and not _identical(pair):
                        taken.add(key)
                        pairs.append(pair)
                        break
        return pairs

    def _pool(self, kind: int, t: int) -> Iterator[Pair]:
        """Every pair of a kind, lazily."""
        store = self.store
        if kind == EXTERNAL:
            return (Pair(kind, c, r) for c, r in store.external)
        if kind == INTER_MODEL:
            return (
                Pair(kind, a, b)
                for p in range(len(store.prompts))
                for i in range(1, t + 1)
                for j in range(i)
                for a in store.iterations[i][p]
                for b in store.iterations[j][p]
            )
        earlier = [t] if kind == ONLINE else range(t)
        return (Pair(kind, d, s) for d in store.demos for j in earlier for s in store.iterations[j][d.prompt])

    def _draw(self, kind: int, t: int) -> Pair:
        rng, store = self.rng, self.store
        if kind == EXTERNAL:
            return Pair(kind, *rng.choice(store.external))
        if kind == INTER_MODEL:  # two iterations uniformly, so that each (later, earlier) pair of samples is as likely
            p = rng.randrange(len(store.prompts))
            j, i = sorted(rng.sample(range(t + 1), 2))
            return Pair(kind, rng.choice(store.iterations[i][p]), rng.choice(store.iterations[j][p]))
        demo = rng.choice(store.demos)  # a prompt with more demos has more pairs
        j = t if kind == ONLINE else rng.randrange(t)
        return Pair(kind, demo, rng.choice(store.iterations[j][demo.prompt]))

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "owed": list(self.owed)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.owed = list(state.get("owed", [0.0] * len(KINDS)))  # a checkpoint from before the carry: none


def _identical(pair: Pair) -> bool:
    return torch.equal(pair.chosen.ids, pair.rejected.ids)


@dataclass
class SequenceBatch:
    """Sequences in OpenRLHF's `Actor.forward(sequences, action_mask, attention_mask)` layout: each row is its
    prompt left-padded to the batch's longest prompt, then its response right-padded; `action_mask` covers the
    last `action_mask.shape[1]` positions and marks the real response tokens."""

    sequences: torch.Tensor  # [N, P + R] int64
    attention_mask: torch.Tensor  # [N, P + R] int64
    action_mask: torch.Tensor  # [N, R] bool

    def to(self, device) -> "SequenceBatch":
        return type(self)(**{k: v.to(device) for k, v in vars(self).items()})

    def select(self, rows: torch.Tensor) -> "SequenceBatch":
        """These rows, trimmed of the columns that are padding in all of them."""
        first = int(self.attention_mask[rows].any(0).nonzero()[0])
        R = int(self.action_mask[rows].any(0).nonzero()[-1]) + 1
        end = self.sequences.shape[1] - self.action_mask.shape[1] + R
        return SequenceBatch(
            self.sequences[rows, first:end], self.attention_mask[rows, first:end], self.action_mask[rows, :R]
        )


def collate(prompts: list[torch.Tensor], responses: list[torch.Tensor], pad_token_id: int) -> SequenceBatch:
    # A few whole-batch ops instead of four slice copies per row: a 48-row batch takes ~0.1 ms, not ~0.8 ms.
    prompt_lengths = torch.tensor([p.shape[0] for p in prompts])
    response_lengths = torch.tensor([r.shape[0] for r in responses])
    P, R = int(prompt_lengths.max()), int(response_lengths.max())
    columns = torch.arange(P + R)
    real = (columns >= P - prompt_lengths[:, None]) & (columns < P + response_lengths[:, None])
    sequences = torch.full(real.shape, pad_token_id, dtype=torch.long)
    # each row's real tokens are its prompt then its response, contiguous: fill them in row-major order
    tokens = torch.cat([x for pair in zip(prompts, responses) for x in pair]).to("cpu", torch.long)
    sequences.masked_scatter_(real, tokens)
    action_mask = torch.arange(R) < response_lengths[:, None]
    return SequenceBatch(sequences, real.long(), action_mask)


@dataclass
class PairBatch(SequenceBatch):
    """A pair batch: rows [0, B) are the chosen responses, rows [B, 2B) the rejected ones, so one forward pass
    serves both. `ref_logps` are the cached reference log-probs of all 2B rows."""

    ref_logps: torch.Tensor  # [2B] float32
    kinds: torch.Tensor  # [B] int64: ONLINE, REPLAY, INTER_MODEL or EXTERNAL
    chosen_is_demo: torch.Tensor  # [B] bool
    truncated: torch.Tensor  # [2B] bool: responses cut at the length budget (no EOS)

    def split(self, size: int) -> list["PairBatch"]:
        """Micro-batches of at most `size` pairs."""
        B = len(self.kinds)
        return [self.pairs(i, min(i + size, B)) for i in range(0, B, size)]

    def pairs(self, i: int, j: int) -> "PairBatch":
        """Pairs i..j-1, chosen-then-rejected, trimmed of all-padding columns."""
        B = len(self.kinds)
        rows = torch.cat([torch.arange(i, j), torch.arange(B + i, B + j)])
        return PairBatch(
            **vars(SequenceBatch.select(self, rows)),
            ref_logps=self.ref_logps[rows],
            kinds=self.kinds[i:j],
            chosen_is_demo=self.chosen_is_demo[i:j],
            truncated=self.truncated[rows],
        )


def collate_pairs(pairs: list[Pair], store: SampleStore, pad_token_id: int) -> PairBatch:
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate([store.prompt_of(r) for r in responses], [r.ids for r in responses], pad_token_id)
    return PairBatch(
        **vars(batch),
        ref_logps=torch.tensor([r.ref_logp for r in responses], dtype=torch.float32),
        kinds=torch.tensor([p.kind for p in pairs], dtype=torch.long),
        chosen_is_demo=torch.tensor([p.chosen.iteration == DEMO for p in pairs], dtype=torch.bool),
        truncated=torch.tensor([r.truncated for r in responses], dtype=torch.bool),
    )
