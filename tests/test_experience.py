"""DittoExperienceMaker: every response is scored by the reference exactly once, and pair batches never call it."""

import math

import pytest
import torch

from openrlhf_ditto.experience import DittoExperienceMaker
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import INTER_MODEL, ONLINE, REPLAY, PairSampler, SequenceBatch, collate
from openrlhf_ditto.store import DEMO, SampleStore

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, EOS2 = 0, 2, 3


class CountingReference:
    """The frozen reference: the tiny model's sequence_logps, counting the calls and the rows scored."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.rows = 0
        self.batches: list[SequenceBatch] = []

    def __call__(self, batches: list[SequenceBatch], runs: list[list[str]]) -> torch.Tensor:
        self.calls += 1
        self.rows += sum(b.sequences.shape[0] for b in batches)
        self.batches += batches
        with torch.no_grad():
            return torch.cat([sequence_logps(self.model, b) for b in batches])


def one_logp(model, prompt, response) -> float:
    with torch.no_grad():
        return sequence_logps(model, collate([torch.as_tensor(prompt)], [torch.as_tensor(response)], PAD)).item()


def rollouts(g: torch.Generator, n_prompts: int, m: int, truncate_every: int = 3) -> list[list[list[int]]]:
    """m responses per prompt; every `truncate_every`-th one stops without an EOS (the length limit)."""
    out, k = [], 0
    for _ in range(n_prompts):
        group = []
        for _ in range(m):
            ids = torch.randint(4, 300, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            k += 1
            if k % truncate_every:
                ids.append(EOS if k % 2 else EOS2)
            group.append(ids)
        out.append(group)
    return out


@pytest.fixture
def setup(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (5, 3, 8)]
    prompt_ids = [prompts[0], prompts[1], prompts[0], prompts[2]]  # prompt 0 has two demos
    response_ids = [torch.randint(4, 300, (n,), generator=g).tolist() + [EOS] for n in (4, 6, 2, 7)]
    store = SampleStore.from_demos(prompt_ids, response_ids, [False, False, False, True])
    ref = CountingReference(model)
    maker = DittoExperienceMaker(
        store, PairSampler(store, (0.5, 0.3, 0.2), seed=0), ref, PAD, {EOS, EOS2}, micro_batch_size=3
    )
    return maker, ref, g


def test_score_inputs_scores_each_demo_once(model, setup):
    maker, ref, _ = setup
    store = maker.store
    assert all(math.isnan(d.ref_logp) for d in store.demos)
    maker.score_inputs()
    assert ref.rows == len(store.demos) == 4
    assert ref.calls == 1, "one call hands the reference every micro-batch of the scoring"
    assert [b.sequences.shape[0] for b in ref.batches] == [3, 1]
    for d in store.demos:
        assert d.ref_logp == pytest.approx(one_logp(model, store.prompts[d.prompt], d.ids), abs=1e-5)
    maker.score_inputs()  # a resumed store's demos are scored already: no call at all
    assert ref.rows == 4 and ref.calls == 1


def test_make_experience_scores_each_sample_once_and_flags_truncation(model, setup):
    maker, ref, g = setup
    maker.score_inputs()
    rows, calls = ref.rows, ref.calls
    batch = rollouts(g, 3, 4)
    stats = maker.make_experience(batch)
    n = 3 * 4
    assert ref.rows - rows == n
    assert ref.calls - calls == 1 and len(ref.batches) == math.ceil(4 / 3) + math.ceil(n / 3)
    store = maker.store
    assert store.num_iterations == 1
    for p, group in enumerate(batch):
        stored = store.iterations[0][p]
        assert [s.ids.tolist() for s in stored] == group
        for s, ids in zip(stored, group):
            assert s.prompt == p and s.iteration == 0 and s.ids.dtype == torch.long
            assert s.truncated == (ids[-1] not in (EOS, EOS2))
            assert s.ref_logp == pytest.approx(one_logp(model, store.prompts[p], ids), abs=1e-5)
    samples = [s for by_prompt in store.iterations[0] for s in by_prompt]
    assert stats["samples/count"] == n
    assert stats["samples/truncated_rate"] == pytest.approx(sum(s.truncated for s in samples) / n)
    assert 0 < stats["samples/truncated_rate"] < 1
    assert stats["samples/mean_length"] == pytest.approx(sum(len(s.ids) for s in samples) / n)
    assert stats["samples/max_length"] == max(len(s.ids) for s in samples)
    assert stats["samples/mean_ref_logp"] == pytest.approx(sum(s.ref_logp for s in samples) / n)


def test_pair_batches_never_call_the_reference(model, setup):
    maker, ref, g = setup
    maker.score_inputs()
    maker.make_experience(rollouts(g, 3, 4))
    twin = PairSampler(maker.store, (0.5, 0.3, 0.2), seed=0)  # draws the same pairs, so rows can be identified
    calls, rows = ref.calls, ref.rows

    def draw_and_check(batch_size):
        batch = maker.pair_batch(batch_size)
        pairs = twin.sample(batch_size)
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        expected = torch.tensor([r.ref_logp for r in responses], dtype=torch.float32)
        assert torch.equal(batch.ref_logps, expected)  # the cached values, bit for bit
        assert batch.kinds.tolist() == [p.kind for p in pairs]
        assert batch.truncated.tolist() == [r.truncated for r in responses]
        return batch

    for _ in range(50):
        batch = draw_and_check(8)
        assert set(batch.kinds.tolist()) == {ONLINE}  # iteration 0: online pairs only
    assert (ref.calls, ref.rows) == (calls, rows)
    with torch.no_grad():  # and they are the reference's log-probs of the batch's own rows
        torch.testing.assert_close(batch.ref_logps, sequence_logps(model, batch), rtol=0, atol=1e-5)

    maker.make_experience(rollouts(g, 3, 4))
    assert ref.rows == rows + 12  # the new iteration only
    calls, rows = ref.calls, ref.rows
    seen = set()
    for _ in range(50):
        batch = draw_and_check(10)
        seen |= set(batch.kinds.tolist())
        assert batch.kinds.tolist().count(REPLAY) == 3 and batch.kinds.tolist().count(INTER_MODEL) == 2
        assert batch.chosen_is_demo.tolist() == [k != INTER_MODEL for k in batch.kinds.tolist()]
    assert seen == {ONLINE, REPLAY, INTER_MODEL}
    assert (ref.calls, ref.rows) == (calls, rows)
    with torch.no_grad():
        torch.testing.assert_close(batch.ref_logps, sequence_logps(model, batch), rtol=0, atol=1e-5)


def test_demo_log_probs_reach_the_batches(setup):
    maker, _, g = setup
    maker.score_inputs()
    maker.make_experience(rollouts(g, 3, 2))
    batch = maker.pair_batch(6)
    B = len(batch.kinds)
    demo_logps = {d.ref_logp for d in maker.store.demos}
    assert all(x in {torch.tensor(v).float().item() for v in demo_logps} for x in batch.ref_logps[:B].tolist())
    assert not any(math.isnan(x) for x in batch.ref_logps.tolist())
    assert all(d.iteration == DEMO for d in maker.store.demos)


def test_wrong_number_of_prompts_raises(setup):
    maker, ref, g = setup
    with pytest.raises(ValueError, match=r"got rollouts for 2 prompts, the store has 3"):
        maker.make_experience(rollouts(g, 2, 2))
    with pytest.raises(ValueError, match=r"got rollouts for 4 prompts, the store has 3"):
        maker.make_experience(rollouts(g, 4, 2))
    assert maker.store.num_iterations == 0 and ref.calls == 0


def test_an_empty_rollout_raises_a_clear_error(setup):
    maker, ref, _ = setup
    with pytest.raises(ValueError, match=r"a rollout has no tokens"):
        maker.make_experience([[[5, EOS]], [[]], [[6]]])
    assert maker.store.num_iterations == 0 and ref.calls == 0
