"""PairSampler (kinds, counts, determinism, resumption) and the collation of pairs into tensor batches."""

import copy
import itertools
import json
import pickle
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_ditto.demos import Demo
from openrlhf_ditto.pairs import (
    EXTERNAL,
    INTER_MODEL,
    KINDS,
    ONLINE,
    REPLAY,
    PairBatch,
    PairSampler,
    collate,
    collate_pairs,
    kind_counts,
)
from openrlhf_ditto.store import DEMO, Response, SampleStore
from openrlhf_ditto.store import EXTERNAL as EXTERNAL_ITERATION

PAD = 0
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)  # the same examples every run


@st.composite
def stores(draw, unique: bool = True, min_iterations: int = 1, max_iterations: int = 4) -> SampleStore:
    """A store of random token sequences: several prompts, 1-3 demos per prompt, T iterations of M samples, and 1-3
    external pairs (on prompts of their own, sometimes shared).

    With `unique` every response starts with a token of its own, so no two responses are identical; without it
    the responses are 1-2 tokens over a 2-token vocabulary, so identical responses are the rule.
    """
    serial = itertools.count(1000)
    tokens = st.lists(st.integers(1, 50 if unique else 2), min_size=1, max_size=6 if unique else 2)

    def response(prompt: int, iteration: int) -> Response:
        ids = draw(tokens)
        if unique:
            ids = [next(serial)] + ids
        ref = draw(st.floats(-200, 0, allow_nan=False, width=32))
        return Response(prompt, torch.tensor(ids, dtype=torch.long), ref, draw(st.booleans()), iteration)

    n_prompts = draw(st.integers(1, 4))
    prompts = [draw(st.lists(st.integers(1, 50), min_size=1, max_size=5)) for _ in range(n_prompts)]
    demos = [response(p, DEMO) for p in range(n_prompts) for _ in range(draw(st.integers(1, 3)))]
    store = SampleStore(prompts, demos)
    m = draw(st.integers(1, 3))
    for t in range(draw(st.integers(min_iterations, max_iterations))):
        store.add_iteration([response(p, t) for p in range(n_prompts) for _ in range(m)])
    external_prompts = [
        draw(st.lists(st.integers(1, 50), min_size=1, max_size=5)) for _ in range(draw(st.integers(1, 2)))
    ]
    store.add_external(
        [
            tuple(Demo("", "", draw(st.sampled_from(external_prompts)), [next(serial), 7], False) for _ in range(2))
            for _ in range(draw(st.integers(1, 3)))
        ]
    )
    for pair in store.external:
        for r in pair:
            r.ref_logp = draw(st.floats(-200, 0, allow_nan=False, width=32))  # scored, as the trainer does first
    return store


@st.composite
def fraction_lists(draw) -> tuple[float, ...]:
    """Three shares (online, replay, inter_model) or four (and external)."""
    n = draw(st.sampled_from([3, 4]))
    weights = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n).filter(lambda w: sum(w) > 0))
    return tuple(w / sum(weights) for w in weights)


def check_kind(pair, store: SampleStore) -> None:
    """The pair is of its kind: the right sources, the same prompt, and the chosen ranked above the rejected."""
    t = store.num_iterations - 1
    chosen, rejected = pair.chosen, pair.rejected
    assert chosen.prompt == rejected.prompt
    if pair.kind == EXTERNAL:  # one of the store's external pairs, chosen above rejected as given
        assert any(chosen is c and rejected is r for c, r in store.external)
        assert chosen.iteration == rejected.iteration == EXTERNAL_ITERATION
        return
    if pair.kind == ONLINE:
        assert chosen.iteration == DEMO and rejected.iteration == t
        assert any(chosen is d for d in store.demos_by_prompt[chosen.prompt])
    elif pair.kind == REPLAY:
        assert chosen.iteration == DEMO and 0 <= rejected.iteration < t
    else:
        assert pair.kind == INTER_MODEL
        assert t >= chosen.iteration > rejected.iteration >= 0
    if rejected.iteration >= 0:  # it is one of the store's samples of that prompt and iteration
        assert any(rejected is s for s in store.iterations[rejected.iteration][rejected.prompt])
    if chosen.iteration >= 0:
        assert any(chosen is s for s in store.iterations[chosen.iteration][chosen.prompt])


def signature(pairs) -> list[tuple[int, int, int]]:
    return [(p.kind, id(p.chosen), id(p.rejected)) for p in pairs]


def within_one_pair(counts: list[int], fractions: tuple[float, ...], batch_size: int, has_history: bool) -> None:
    f = list(fractions) + [0.0] * (4 - len(fractions))
    if not has_history:  # iteration 0: the replay and inter-model shares go to online pairs
        f = [f[0] + f[1] + f[2], 0.0, 0.0, f[3]]
    for count, fraction in zip(counts, f, strict=True):
        assert abs(count - fraction * batch_size) < 1
        if fraction == 0:
            assert count == 0


@SETTINGS
@given(
    store=stores(),
    fractions=fraction_lists(),
    batch_size=st.integers(1, 40),
    seed=st.integers(0, 2**32),
)
def test_pairs_have_their_kind_and_the_batch_its_counts(store, fractions, batch_size, seed):
    pairs = PairSampler(store, fractions, seed=seed).sample(batch_size)
    t = store.num_iterations - 1
    assert len(pairs) == batch_size  # every response is distinct, so no slot is dropped
    for pair in pairs:
        check_kind(pair, store)
        assert not torch.equal(pair.chosen.ids, pair.rejected.ids)
    counts = [sum(p.kind == k for p in pairs) for k in range(len(KINDS))]
    assert counts == kind_counts(batch_size, fractions, t > 0)
    within_one_pair(counts, fractions, batch_size, t > 0)
    # pairs of one kind come together, in KINDS order
    assert [p.kind for p in pairs] == sorted(p.kind for p in pairs)


@SETTINGS
@given(
    batch_size=st.integers(1, 200),
    fractions=fraction_lists(),
    has_history=st.booleans(),
)
def test_kind_counts_round_within_one_pair(batch_size, fractions, has_history):
    counts = kind_counts(batch_size, fractions, has_history)
    assert sum(counts) == batch_size and min(counts) >= 0 and len(counts) == len(KINDS)
    within_one_pair(counts, fractions, batch_size, has_history)


@SETTINGS
@given(store=stores(unique=False), fractions=fraction_lists(), batch_size=st.integers(1, 30), seed=st.integers(0, 99))
def test_no_pair_has_two_identical_responses(store, fractions, batch_size, seed):
    pairs = PairSampler(store, fractions, seed=seed).sample(batch_size)
    expected = kind_counts(batch_size, fractions, store.num_iterations > 1)
    for pair in pairs:
        check_kind(pair, store)
        assert not torch.equal(pair.chosen.ids, pair.rejected.ids)
    for k in range(len(KINDS)):
        assert sum(p.kind == k for p in pairs) <= expected[k]


def test_samples_equal_to_their_demo_drop_the_online_pairs_rather_than_loop():
    demos = [Response(p, torch.tensor([5, 6, p + 7]), -1.0, False, DEMO) for p in range(2)]
    store = SampleStore([[1, 2], [3]], demos)
    parrot = [Response(d.prompt, d.ids.clone(), -2.0, False, 0) for d in demos for _ in range(3)]
    store.add_iteration(parrot)
    sampler = PairSampler(store, (0.5, 0.25, 0.25), seed=0)
    assert sampler.sample(16) == []  # iteration 0: every pair is online, and every one is a demo against itself

    # a store whose first iteration differs from the demos and whose second reproduces them
    store = SampleStore([[1, 2], [3]], demos)
    store.add_iteration([Response(d.prompt, torch.tensor([9, d.prompt]), -3.0, False, 0) for d in demos])
    store.add_iteration([Response(d.prompt, d.ids.clone(), -2.0, False, 1) for d in demos for _ in range(2)])
    pairs = PairSampler(store, (0.5, 0.25, 0.25), seed=0).sample(16)
    counts = [sum(p.kind == k for p in pairs) for k in range(len(KINDS))]
    assert counts == [0, 4, 4, 0]  # online dropped; replay and inter_model (iteration 1 over 0) kept in full
    for pair in pairs:
        check_kind(pair, store)
        assert not torch.equal(pair.chosen.ids, pair.rejected.ids)


@SETTINGS
@given(store=stores(), seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_same_seed_same_batches(store, seed, sizes):
    a, b = PairSampler(store, seed=seed), PairSampler(store, seed=seed)
    for size in sizes:
        assert signature(a.sample(size)) == signature(b.sample(size))


def test_different_seeds_give_different_batches():
    store = _big_store()
    batches = {seed: signature(PairSampler(store, seed=seed).sample(32)) for seed in range(4)}
    assert len({tuple(v) for v in batches.values()}) == 4


def _big_store() -> SampleStore:
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, DEMO) for p in range(5)]
    store = SampleStore([[p + 1] for p in range(5)], demos)
    for t in range(3):
        store.add_iteration(
            [Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, t) for p in range(5) for _ in range(4)]
        )
    return store


@pytest.mark.parametrize("roundtrip", ["none", "pickle", "json", "torch"])
@SETTINGS
@given(store=stores(), seed=st.integers(0, 2**32), before=st.integers(0, 3), after=st.integers(1, 4))
def test_state_dict_continues_the_same_stream(tmp_path_factory, roundtrip, store, seed, before, after):
    sampler = PairSampler(store, seed=seed)
    for _ in range(before):
        sampler.sample(5)
    state = sampler.state_dict()
    if roundtrip == "pickle":
        state = pickle.loads(pickle.dumps(state))
    elif roundtrip == "json":  # tuples come back as lists
        state = json.loads(json.dumps(state))
    elif roundtrip == "torch":
        file = tmp_path_factory.mktemp("state") / "rng.pt"
        torch.save(state, file)
        state = torch.load(file, weights_only=False)
    expected = [signature(sampler.sample(7)) for _ in range(after)]
    resumed = PairSampler(store, seed=seed + 1)
    resumed.load_state_dict(copy.deepcopy(state))
    assert [signature(resumed.sample(7)) for _ in range(after)] == expected


@pytest.mark.parametrize(
    "fractions",
    [
        (0.5, 0.2, 0.1),
        (0.7, 0.2, 0.2),
        (1.2, -0.1, -0.1),
        (1.0, -0.5, 0.5),
        (0.7, 0.3),
        (0.6, 0.2, 0.1, 0.0, 0.1),
        (0.7, 0.2, 0.2, -0.1),
        (0, 0, 0),
    ],
)
def test_bad_fractions_raise_and_name_them(fractions):
    store = _big_store()
    with pytest.raises(ValueError, match=re.escape(f"inter_model[, external]) = {tuple(fractions)}")) as info:
        PairSampler(store, fractions)
    assert ">= 0 and sum to 1" in str(info.value)


def test_an_external_share_needs_external_pairs():
    with pytest.raises(ValueError, match="external pairs in the store"):
        PairSampler(_big_store(), (0.6, 0.2, 0.1, 0.1))
    assert PairSampler(_big_store(), (0.7, 0.2, 0.1, 0.0)).sample(10)  # a zero share needs none


def test_sampling_an_empty_store_says_so():
    store = SampleStore([[1]], [Response(0, torch.tensor([2]), 0.0, False, DEMO)])
    with pytest.raises(RuntimeError, match="no samples yet"):
        PairSampler(store).sample(4)


# ---------------------------------------------------------------------------------------------------- collation

token_lists = st.lists(st.integers(1, 400), min_size=1, max_size=12)


@SETTINGS
@given(rows=st.lists(st.tuples(token_lists, token_lists), min_size=1, max_size=8))
def test_collate_layout(rows):
    prompts = [torch.tensor(p) for p, _ in rows]
    responses = [torch.tensor(r) for _, r in rows]
    batch = collate(prompts, responses, PAD)
    P, R = max(map(len, prompts)), max(map(len, responses))
    assert batch.sequences.shape == batch.attention_mask.shape == (len(rows), P + R)
    assert batch.action_mask.shape == (len(rows), R)
    assert batch.sequences.dtype == batch.attention_mask.dtype == torch.long and batch.action_mask.dtype == torch.bool
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row, mask = batch.sequences[i].tolist(), batch.attention_mask[i].tolist()
        lp, lr = len(p), len(r)
        assert row == [PAD] * (P - lp) + p.tolist() + r.tolist() + [PAD] * (R - lr)
        assert mask == [0] * (P - lp) + [1] * (lp + lr) + [0] * (R - lr)
        assert batch.action_mask[i].tolist() == [True] * lr + [False] * (R - lr)
        # the action mask, over the last R columns, picks out exactly the response tokens
        assert batch.sequences[i, -R:][batch.action_mask[i]].tolist() == r.tolist()
    assert batch.action_mask.sum().item() == sum(map(len, responses))


def test_collate_prompts_alone():
    """Empty responses (a batch of prompts to generate from): left-padded prompts and an action mask of width 0."""
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    batch = collate(prompts, [p[:0] for p in prompts], PAD)
    assert batch.sequences.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.action_mask.shape == (2, 0) and batch.action_mask.dtype == torch.bool


def _pairs_and_batch(store, seed, batch_size):
    pairs = PairSampler(store, (0.4, 0.3, 0.2, 0.1), seed=seed).sample(batch_size)
    return pairs, collate_pairs(pairs, store, PAD)


@SETTINGS
@given(store=stores(), seed=st.integers(0, 2**32), batch_size=st.integers(1, 12))
def test_collate_pairs_puts_chosen_first_and_carries_the_fields(store, seed, batch_size):
    pairs, batch = _pairs_and_batch(store, seed, batch_size)
    B = len(pairs)
    assert isinstance(batch, PairBatch)
    assert batch.sequences.shape[0] == 2 * B
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    expected = collate([store.prompt_of(r) for r in responses], [r.ids for r in responses], PAD)
    assert torch.equal(batch.sequences, expected.sequences)
    assert torch.equal(batch.attention_mask, expected.attention_mask)
    assert torch.equal(batch.action_mask, expected.action_mask)
    R = batch.action_mask.shape[1]
    for i, r in enumerate(responses):
        assert batch.sequences[i, -R:][batch.action_mask[i]].tolist() == r.ids.tolist()
        real = batch.sequences[i][batch.attention_mask[i].bool()].tolist()
        prompts = store.external_prompts if r.iteration == EXTERNAL_ITERATION else store.prompts
        assert real == prompts[r.prompt].tolist() + r.ids.tolist()
    assert batch.ref_logps.dtype == torch.float32
    assert batch.ref_logps.tolist() == [torch.tensor(r.ref_logp, dtype=torch.float32).item() for r in responses]
    assert batch.kinds.tolist() == [p.kind for p in pairs]
    assert batch.chosen_is_demo.tolist() == [p.chosen.iteration == DEMO for p in pairs]
    assert batch.truncated.tolist() == [r.truncated for r in responses]
    assert batch.chosen_is_demo.tolist() == [KINDS[k] in ("online", "replay") for k in batch.kinds.tolist()]


@SETTINGS
@given(store=stores(), seed=st.integers(0, 2**32), batch_size=st.integers(1, 12), size=st.integers(1, 5))
def test_split_keeps_every_pair_and_trims_padding(store, seed, batch_size, size):
    pairs, batch = _pairs_and_batch(store, seed, batch_size)
    B = len(pairs)
    parts = batch.split(size)
    assert [len(p.kinds) for p in parts] == [min(size, B - i) for i in range(0, B, size)]
    chosen, rejected = [], []
    for part in parts:
        n = len(part.kinds)
        assert part.sequences.shape[0] == 2 * n
        assert part.attention_mask[:, 0].any() and part.action_mask[:, -1].any()  # no all-padding column
        rows = [part.sequences[i][part.attention_mask[i].bool()].tolist() for i in range(2 * n)]
        chosen += rows[:n]
        rejected += rows[n:]
        R = part.action_mask.shape[1]
        for i in range(2 * n):
            assert part.sequences[i, -R:][part.action_mask[i]].tolist() == rows[i][-int(part.action_mask[i].sum()) :]
    full = [batch.sequences[i][batch.attention_mask[i].bool()].tolist() for i in range(2 * B)]
    assert chosen == full[:B] and rejected == full[B:]
    for name in ("ref_logps", "truncated"):
        whole = getattr(batch, name)
        assert torch.cat([getattr(p, name)[: len(p.kinds)] for p in parts]).tolist() == whole[:B].tolist()
        assert torch.cat([getattr(p, name)[len(p.kinds) :] for p in parts]).tolist() == whole[B:].tolist()
    assert torch.cat([p.kinds for p in parts]).tolist() == batch.kinds.tolist()
    assert torch.cat([p.chosen_is_demo for p in parts]).tolist() == batch.chosen_is_demo.tolist()


@pytest.mark.parametrize("batch_size", [24, 4, 7])
def test_kind_shares_converge_to_the_fractions_over_a_run(batch_size):
    """Batches of 24 at 0.7/0.2/0.1 rounded alike every time give inter-model pairs 2 of 24, 8.3% forever, and
    batches of 4 none: the sampler carries each batch's rounding over to the next."""
    sampler = PairSampler(_big_store(), (0.7, 0.2, 0.1), seed=0)
    totals, n = [0] * len(KINDS), 0
    for _ in range(60):
        pairs = sampler.sample(batch_size)
        n += len(pairs)
        for p in pairs:
            totals[p.kind] += 1
        for total, fraction in zip(totals, (0.7, 0.2, 0.1, 0.0)):
            assert abs(total - fraction * n) < 1  # at every step of the run, within one pair of the fractions
    assert n == 60 * batch_size


def pool(store: SampleStore, kind: int) -> list[tuple[int, int]]:
    """Every pair of a kind of two distinct responses, enumerated the obvious way, as (id chosen, id rejected)."""
    t = store.num_iterations - 1
    if kind == EXTERNAL:
        pairs = store.external
    elif kind == INTER_MODEL:
        pairs = [
            (a, b)
            for p in range(len(store.prompts))
            for i, j in itertools.combinations(range(t + 1), 2)
            for a in store.iterations[j][p]
            for b in store.iterations[i][p]
        ]
    else:
        iterations = [t] if kind == ONLINE else range(t)
        pairs = [(d, s) for d in store.demos for j in iterations for s in store.iterations[j][d.prompt]]
    return [(id(a), id(b)) for a, b in pairs if not torch.equal(a.ids, b.ids)]


@SETTINGS
@given(store=stores(unique=False), fractions=fraction_lists(), batch_size=st.integers(1, 40), seed=st.integers(0, 99))
def test_no_pair_comes_twice_in_a_batch_while_its_kind_has_unused_pairs(store, fractions, batch_size, seed):
    """The official code draws a batch's pairs without replacement; with replacement, 7 prompts x 4 samples gave
    8-pair batches ~11% duplicate pairs at the first iteration."""
    pairs = PairSampler(store, fractions, seed=seed).sample(batch_size)
    for kind, count in enumerate(kind_counts(batch_size, fractions, store.num_iterations > 1)):
        drawn = [(id(p.chosen), id(p.rejected)) for p in pairs if p.kind == kind]
        available = pool(store, kind)
        assert set(drawn) <= set(available)
        assert len(set(drawn)) == min(count, len(available))
        if (
            available and count
        ):  # a pair comes again only once all of them are in: the pool, shuffled, as often as needed
            assert len(drawn) == count
            assert max(drawn.count(k) for k in drawn) <= -(-count // len(available))


def test_first_iteration_batches_have_no_duplicate_pairs():
    """The issue's setting: 7 prompts x 4 samples, one demo each, 8-pair batches at the first iteration."""
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, DEMO) for p in range(7)]
    store = SampleStore([[p + 1] for p in range(7)], demos)
    store.add_iteration(
        [Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, 0) for p in range(7) for _ in range(4)]
    )
    sampler = PairSampler(store, seed=0)
    for _ in range(200):
        keys = signature(sampler.sample(8))
        assert len(set(keys)) == len(keys) == 8


@pytest.mark.parametrize("samples", [1, 4])  # 7 prompts x 1 sample: few enough pairs to enumerate; x 4: drawn
def test_inter_model_pairs_are_uniform_over_later_earlier_sample_pairs(samples):
    """At the fourth iteration (t = 3) half of the (later, earlier) sample pairs have the newest samples as chosen
    (3 of the 6 iteration pairs); drawing the later iteration uniformly first gave them a third."""
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, DEMO) for p in range(7)]
    store = SampleStore([[p + 1] for p in range(7)], demos)
    for t in range(4):
        store.add_iteration(
            [
                Response(p, torch.randint(1, 300, (8,), generator=g), -1.0, False, t)
                for p in range(7)
                for _ in range(samples)
            ]
        )
    sampler = PairSampler(store, (0.0, 0.0, 1.0), seed=0)
    counts = {}
    for _ in range(300):
        for p in sampler.sample(8):
            key = (p.chosen.iteration, p.rejected.iteration)
            counts[key] = counts.get(key, 0) + 1
    n = sum(counts.values())
    assert sorted(counts) == [(i, j) for i in range(4) for j in range(i)]
    for key, count in counts.items():
        assert count / n == pytest.approx(1 / 6, abs=0.02), (key, count / n)
