"""SampleStore: grouping, exact save/load round trips, partial loads and errors."""

import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_ditto.store import DEMO, EXTERNAL, Response, SampleStore

SPECIAL_FLOATS = [0.0, -0.0, 5e-324, -2.2250738585072014e-308, 1e308, -1.0 / 3.0, math.inf, -math.inf, 0.1 + 0.2]


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


@st.composite
def stores(draw) -> SampleStore:
    ids = st.lists(st.integers(0, 2**40), min_size=1, max_size=6)
    logps = st.one_of(st.floats(allow_nan=False), st.sampled_from(SPECIAL_FLOATS))
    n_prompts = draw(st.integers(1, 3))
    prompts = [draw(ids) for _ in range(n_prompts)]

    def response(p, t):
        return Response(p, torch.tensor(draw(ids), dtype=torch.long), draw(logps), draw(st.booleans()), t)

    demos = [response(p, DEMO) for p in range(n_prompts) for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        demos[0].ref_logp = float("nan")  # not scored yet
    store = SampleStore(prompts, demos)
    for t in range(draw(st.integers(0, 3))):
        store.add_iteration([response(p, t) for p in range(n_prompts) for _ in range(draw(st.integers(1, 3)))])
    if draw(st.booleans()):  # external pairs, on prompts of their own
        n_external = draw(st.integers(1, 2))
        store.external_prompts = [torch.tensor(draw(ids), dtype=torch.long) for _ in range(n_external)]
        store.external = [
            tuple(response(draw(st.integers(0, n_external - 1)), EXTERNAL) for _ in range(2))
            for _ in range(draw(st.integers(1, 3)))
        ]
    return store


def assert_same_response(a: Response, b: Response) -> None:
    assert b.ids.dtype == torch.long and b.ids.dim() == 1
    assert torch.equal(a.ids, b.ids)
    assert bits(a.ref_logp) == bits(b.ref_logp) and a.ref_logp.hex() == b.ref_logp.hex()
    assert type(b.ref_logp) is float
    assert (a.prompt, a.truncated, a.iteration) == (b.prompt, b.truncated, b.iteration)
    assert type(b.truncated) is bool


def assert_same_store(a: SampleStore, b: SampleStore, num_iterations: int | None = None) -> None:
    assert len(a.prompts) == len(b.prompts)
    for x, y in zip(a.prompts, b.prompts):
        assert y.dtype == torch.long and torch.equal(x, y)
    assert len(a.demos) == len(b.demos)
    for x, y in zip(a.demos, b.demos):
        assert_same_response(x, y)
    assert [len(g) for g in a.demos_by_prompt] == [len(g) for g in b.demos_by_prompt]
    for ga, gb in zip(a.demos_by_prompt, b.demos_by_prompt):
        for x, y in zip(ga, gb):
            assert_same_response(x, y)
        assert all(any(d is y for d in b.demos) for y in gb)  # the groups hold the store's own demo objects
    assert len(a.external_prompts) == len(b.external_prompts)
    for x, y in zip(a.external_prompts, b.external_prompts):
        assert y.dtype == torch.long and torch.equal(x, y)
    assert len(a.external) == len(b.external)
    for x, y in zip(a.external, b.external):
        assert_same_response(x[0], y[0])
        assert_same_response(x[1], y[1])
    n = a.num_iterations if num_iterations is None else num_iterations
    assert b.num_iterations == n
    for t in range(n):
        assert [len(g) for g in a.iterations[t]] == [len(g) for g in b.iterations[t]]
        for ga, gb in zip(a.iterations[t], b.iterations[t]):
            for x, y in zip(ga, gb):
                assert_same_response(x, y)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(store=stores())
def test_save_load_round_trip_is_exact(store):
    with tempfile.TemporaryDirectory() as folder:
        store.save(folder)
        assert not list(Path(folder).glob("*.tmp"))
        loaded = SampleStore.load(folder)
        assert_same_store(store, loaded)
        loaded.save(folder)  # saving the loaded store again changes nothing
        assert_same_store(store, SampleStore.load(folder))
        for k in range(store.num_iterations + 1):
            assert_same_store(store, SampleStore.load(folder, num_iterations=k), num_iterations=k)


def test_unscored_demos_stay_nan(tmp_path):
    store = SampleStore.from_demos([[1, 2]], [[3, 4]], [False])
    store.save(tmp_path)
    assert math.isnan(SampleStore.load(tmp_path).demos[0].ref_logp)


def _store_with(num_iterations: int, offset: int = 0) -> SampleStore:
    store = SampleStore([[1], [2, 3]], [Response(p, torch.tensor([7, p]), -1.5, False, DEMO) for p in range(2)])
    for t in range(num_iterations):
        store.add_iteration(
            [
                Response(p, torch.tensor([offset + t, p, m]), -2.0 - t - m / 7, m == 1, t)
                for p in range(2)
                for m in range(2)
            ]
        )
    return store


def test_load_only_the_iterations_asked_for(tmp_path):
    store = _store_with(3)
    store.save(tmp_path)
    assert SampleStore.load(tmp_path, num_iterations=0).num_iterations == 0
    two = SampleStore.load(tmp_path, num_iterations=2)
    assert two.num_iterations == 2
    assert_same_store(store, two, num_iterations=2)
    assert SampleStore.load(tmp_path).num_iterations == 3
    with pytest.raises(FileNotFoundError, match=r"holds 3 iterations of samples, the checkpoint needs 5"):
        SampleStore.load(tmp_path, num_iterations=5)


def test_save_writes_each_iteration_and_the_external_pairs_once(tmp_path):
    from openrlhf_ditto.demos import Demo

    store = _store_with(2)
    store.add_external([(Demo("", "", [4, 4], [5, 2], False), Demo("", "", [4, 4], [6, 2], True))])
    for r in store.external[0]:
        r.ref_logp = -1.5
    store.save(tmp_path)
    files = [tmp_path / "iteration_00000.json", tmp_path / "external.json"]
    stamps = []
    for f in files:
        f.write_text(f.read_text())  # same content, new mtime: a rewrite would change it again
        stamps.append(f.stat().st_mtime_ns)
    store.add_iteration([Response(p, torch.tensor([9, p]), -3.0, False, 2) for p in range(2)])
    store.save(tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    loaded = SampleStore.load(tmp_path)
    assert loaded.num_iterations == 3
    assert [r.ref_logp for r in loaded.external[0]] == [-1.5, -1.5]
    assert loaded.prompt_of(loaded.external[0][1]).tolist() == [4, 4] and loaded.external[0][1].truncated


def test_a_resumed_store_replaces_the_iterations_it_resamples(tmp_path):
    """A run that crashed after saving iteration 2's samples resumes from the checkpoint of iteration 2: it loads
    two iterations, samples iteration 2 again and saves. The folder must then hold the new samples, the ones the
    resumed run trains on, not the lost run's."""
    _store_with(3).save(tmp_path)
    resumed = SampleStore.load(tmp_path, num_iterations=2)
    fresh = _store_with(3, offset=100)
    resumed.add_iteration(fresh.iterations[2][0] + fresh.iterations[2][1])
    resumed.save(tmp_path)
    assert_same_store(resumed, SampleStore.load(tmp_path))


def test_add_iteration_needs_a_sample_for_every_prompt():
    store = _store_with(1)
    with pytest.raises(ValueError, match="at least one sample for every prompt"):
        store.add_iteration([Response(0, torch.tensor([4]), -1.0, False, 1)])
    assert store.num_iterations == 1
    store.add_iteration([Response(p, torch.tensor([4]), -1.0, False, 1) for p in (1, 0)])
    assert store.num_iterations == 2
    assert [[s.prompt for s in g] for g in store.iterations[1]] == [[0], [1]]


def test_from_demos_groups_demos_that_share_a_prompt():
    prompt_ids = [[1, 2], [3], [1, 2], [4, 5, 6], [3], [1, 2]]
    response_ids = [[10 + i, i] for i in range(6)]
    truncated = [False, True, False, False, True, False]
    store = SampleStore.from_demos(prompt_ids, response_ids, truncated)
    assert [p.tolist() for p in store.prompts] == [[1, 2], [3], [4, 5, 6]]  # first-seen order
    assert [d.prompt for d in store.demos] == [0, 1, 0, 2, 1, 0]
    assert [[d.ids.tolist() for d in g] for g in store.demos_by_prompt] == [
        [[10, 0], [12, 2], [15, 5]],
        [[11, 1], [14, 4]],
        [[13, 3]],
    ]
    assert [d.truncated for d in store.demos] == truncated
    assert all(d.iteration == DEMO and math.isnan(d.ref_logp) for d in store.demos)
    assert all(d.ids.dtype == torch.long for d in store.demos) and store.num_iterations == 0
