"""DittoActorLoss against the closed form and OpenRLHF's DPOLoss; sequence_logps against a naive reference."""

import os

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # before anything imports openrlhf.models

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from openrlhf.models.loss import DPOLoss
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from openrlhf_ditto.loss import DittoActorLoss, sequence_logps
from openrlhf_ditto.pairs import EXTERNAL, INTER_MODEL, KINDS, ONLINE, REPLAY, PairSampler, collate, collate_pairs
from openrlhf_ditto.store import DEMO, Response, SampleStore

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    dict(beta=0.1),
    dict(beta=0.5),
    dict(beta=0.05, label_smoothing=0.1),
    dict(beta=0.3, label_smoothing=0.25),
    dict(beta=0.1, ipo=True),
    dict(beta=2.0, ipo=True),
]


def random_logps(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(n, generator=g, dtype=torch.float64) * 60 for _ in range(4))
    kinds = torch.randint(0, len(KINDS), (n,), generator=g)
    lengths = torch.randint(1, 40, (n,), generator=g)
    return pc, pr, rc, rr, kinds, lengths


def rejected_lengths(seed: int, n: int = 12):
    return torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(seed + 100))


@pytest.mark.parametrize("config", SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_the_closed_form(config, seed):
    pc, pr, rc, rr, kinds, lc = random_logps(seed)
    lr = rejected_lengths(seed)
    loss, metrics = DittoActorLoss(**config)(pc, pr, rc, rr, kinds, lc, rejected_lengths=lr)
    beta, eps = config["beta"], config.get("label_smoothing", 0.0)
    x = (pc - pr) - (rc - rr)
    if config.get("ipo"):  # on per-token means (TRL, the IPO paper)
        expected = ((((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)) ** 2).mean()
    else:  # -logsigmoid(z) = softplus(-z) = log(1 + exp(-z))
        expected = ((1 - eps) * F.softplus(-beta * x) + eps * F.softplus(beta * x)).mean()
        by_hand = sum((1 - eps) * math.log1p(math.exp(-beta * v)) + eps * math.log1p(math.exp(beta * v)) for v in x)
        assert loss.item() == pytest.approx(by_hand / len(x), rel=1e-9)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    assert metrics["dpo_loss"] == metrics["loss"] == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_ipo_target_does_not_scale_with_length(beta):
    """IPO's target margin 1/(2 beta) is per token: a pair whose responses are k times as long, with the same
    per-token log-probs, has the same loss (on summed log-probs its margin grew k times past the target)."""
    pc, pr, rc, rr, kinds, lc = random_logps(5)
    lr = rejected_lengths(5)
    ipo = DittoActorLoss(beta=beta, ipo=True)
    short, _ = ipo(pc, pr, rc, rr, kinds, lc, rejected_lengths=lr)
    long, _ = ipo(pc * 4, pr * 4, rc * 4, rr * 4, kinds, lc * 4, rejected_lengths=lr * 4)
    torch.testing.assert_close(long, short, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="IPO compares per-token log-probs"):
        ipo(pc, pr, rc, rr, kinds)


@pytest.mark.parametrize("config", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_openrlhf_dpo_loss(config, dtype):
    """OpenRLHF's DPOLoss on summed log-probs, and for IPO on per-token means (what TRL's IPO hands its loss)."""
    pc, pr, rc, rr, kinds, lc = (x.to(dtype) if x.is_floating_point() else x for x in random_logps(7, n=16))
    lr = rejected_lengths(7, n=16)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    ours, metrics = DittoActorLoss(**config)(pc, pr, rc, rr, kinds, lc, rejected_lengths=lr)
    if config.get("ipo"):
        theirs, _, _ = DPOLoss(**config)(pc / lc, pr / lr, rc / lc, rr / lr)
        _, chosen_rewards, rejected_rewards = DPOLoss(config["beta"])(pc, pr, rc, rr)  # the metrics: on sums
    else:
        theirs, chosen_rewards, rejected_rewards = DPOLoss(**config)(pc, pr, rc, rr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(
        torch.stack(torch.autograd.grad(ours, [pc, pr])), torch.stack(torch.autograd.grad(theirs, [pc, pr]))
    )
    margins = chosen_rewards - rejected_rewards
    assert metrics["margin"] == pytest.approx(margins.mean().item(), rel=1e-6)
    assert metrics["acc"] == pytest.approx((margins > 0).float().mean().item())
    for k, name in enumerate(KINDS):
        mask = kinds == k
        assert metrics[f"{name}/chosen_reward"] == pytest.approx(chosen_rewards[mask].mean().item(), rel=1e-6)
        assert metrics[f"{name}/rejected_reward"] == pytest.approx(rejected_rewards[mask].mean().item(), rel=1e-6)


def test_metrics_per_kind_match_a_manual_computation():
    beta = 0.2
    # pair:        0      1      2      3      4      5      6      7
    kinds = torch.tensor([ONLINE, ONLINE, REPLAY, ONLINE, INTER_MODEL, REPLAY, REPLAY, EXTERNAL])
    pc = torch.tensor([-10.0, -20.0, -5.0, -7.0, -30.0, -8.0, -9.0, -4.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -18.0, -9.0, -7.0, -28.0, -8.0, -3.0, -6.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -19.0, -6.0, -7.0, -31.0, -8.5, -9.0, -5.0], dtype=torch.float64)
    rr = torch.tensor([-11.0, -19.0, -8.0, -7.0, -29.0, -8.0, -4.0, -5.0], dtype=torch.float64)
    _, metrics = DittoActorLoss(beta=beta)(pc, pr, rc, rr, kinds)
    margins = [
        beta * ((c - r) - (qc - qr)) for c, r, qc, qr in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
    ]
    losses = [math.log1p(math.exp(-m)) for m in margins]  # beta * logits == the reward margin
    for k, name in enumerate(KINDS):
        idx = [i for i, kind in enumerate(kinds.tolist()) if kind == k]
        assert metrics[f"{name}/count"] == len(idx)
        assert metrics[f"{name}/acc"] == pytest.approx(sum(margins[i] > 0 for i in idx) / len(idx))
        assert metrics[f"{name}/margin"] == pytest.approx(sum(margins[i] for i in idx) / len(idx))
        assert metrics[f"{name}/loss"] == pytest.approx(sum(losses[i] for i in idx) / len(idx))
        chosen = [beta * (pc[i] - rc[i]).item() for i in idx]
        assert metrics[f"{name}/chosen_reward"] == pytest.approx(sum(chosen) / len(idx))
    counts = tuple(metrics[f"{name}/count"] for name in ("online", "replay", "inter_model", "external"))
    assert counts == (3, 3, 1, 1)
    assert metrics["online/acc"] == pytest.approx(1 / 3)  # pairs 0 (+), 1 (-), 3 (0 is no win)
    assert metrics["acc"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["margin"] == pytest.approx(sum(margins) / len(margins))
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses))


def test_a_missing_kind_counts_zero_and_has_no_averages():
    pc, pr, rc, rr, _, _ = random_logps(0, n=5)
    _, metrics = DittoActorLoss()(pc, pr, rc, rr, torch.full((5,), ONLINE))
    assert metrics["online/count"] == 5 and metrics["replay/count"] == metrics["inter_model/count"] == 0
    assert not any(key.startswith(("replay/", "inter_model/")) and key[-6:] != "/count" for key in metrics)


@pytest.mark.parametrize("config", [dict(beta=0.1), dict(beta=0.1, ipo=True), dict(beta=0.2, label_smoothing=0.1)])
@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_nll_term_is_the_mean_per_token_nll_of_demo_chosen_rows(config, coef):
    pc, pr, rc, rr, kinds, lengths = random_logps(3)
    pc.requires_grad_(True)
    is_demo = kinds != INTER_MODEL
    assert 0 < is_demo.sum() < len(is_demo)
    base, _ = DittoActorLoss(**config)(pc, pr, rc, rr, kinds, lengths, is_demo, rejected_lengths=lengths)
    loss, metrics = DittoActorLoss(**config, nll_coef=coef)(
        pc, pr, rc, rr, kinds, lengths, is_demo, rejected_lengths=lengths
    )
    rows = [i for i in range(len(kinds)) if is_demo[i]]
    nll = sum(-pc[i].item() / lengths[i].item() for i in rows) / len(rows)
    assert metrics["demo_nll"] == pytest.approx(nll, rel=1e-9)
    assert loss.item() == pytest.approx(base.item() + coef * nll, rel=1e-9)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert metrics["dpo_loss"] == pytest.approx(base.item(), rel=1e-9)
    # the NLL term's gradient reaches the demo-chosen rows only
    (g_base,) = torch.autograd.grad(base, pc)
    (g_loss,) = torch.autograd.grad(loss, pc)
    expected = torch.where(is_demo, -coef / (len(rows) * lengths.double()), torch.zeros_like(pc))
    torch.testing.assert_close(g_loss - g_base, expected)
    # no demo-chosen row: no NLL term
    none = torch.zeros_like(is_demo)
    loss, metrics = DittoActorLoss(**config, nll_coef=coef)(
        pc, pr, rc, rr, kinds, lengths, none, rejected_lengths=lengths
    )
    assert loss.item() == base.item() and "demo_nll" not in metrics


# ------------------------------------------------------------------------------------------- sequence log-probs


@pytest.fixture(scope="module")
def models(model):
    """The tiny Llama (rotary positions: relative, so a shift of all positions changes nothing) and a tiny GPT-2
    (learned absolute positions: a left-padded row read at the wrong positions gives other log-probs)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=model.config.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return {"llama": model, "gpt2": GPT2LMHeadModel(config).eval()}


def naive_logp(model, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """One sequence, no padding, no mask: full logits, log_softmax, gather, sum over the response tokens."""
    ids = torch.cat([prompt, response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    P = len(prompt)
    return sum(logprobs[P + k - 1, int(token)].item() for k, token in enumerate(response))


def right_padded_logps(model, prompts, responses, pad: int, positions: bool = True) -> list[float]:
    """The model run once on a batch whose prompts are right-padded (prompt, padding, response, padding), with
    positions from the attention mask; then, row by row, each response token's log-prob is read off the logits
    of the real token before it. `positions=False` leaves the model its default positions 0, 1, 2, ..."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    sequences = torch.full((len(prompts), P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        sequences[i, : len(p)] = p
        sequences[i, P : P + len(r)] = r
        attention_mask[i, : len(p)] = 1
        attention_mask[i, P : P + len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            sequences, attention_mask=attention_mask, position_ids=position_ids if positions else None
        ).logits
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        real = attention_mask[i].nonzero().flatten().tolist()  # the columns of the row's real tokens, in order
        assert [int(sequences[i, c]) for c in real] == p.tolist() + r.tolist()
        n = len(p)
        out.append(sum(logprobs[i, real[n + k - 1], int(token)].item() for k, token in enumerate(r)))
    return out


lengths = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 16)), min_size=1, max_size=6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@settings(max_examples=20, deadline=None, derandomize=True)
@given(shape=lengths, seed=st.integers(0, 2**31))
def test_sequence_logps_of_a_padded_batch_equal_one_sequence_at_a_time(models, name, shape, seed):
    model = models[name]
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (p,), generator=g) for p, _ in shape]
    responses = [torch.randint(1, vocab, (r,), generator=g) for _, r in shape]
    expected = torch.tensor([naive_logp(model, p, r) for p, r in zip(prompts, responses)], dtype=torch.float64)
    with torch.no_grad():
        got = sequence_logps(model, collate(prompts, responses, pad_token_id=0))  # prompts left-padded
    assert got.dtype == torch.float32 and got.shape == (len(shape),)
    # 1e-5, plus 1e-6 relative: a sum near -95 (16 tokens of a random model) is only good to 7.6e-6 in fp32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    right = torch.tensor(right_padded_logps(model, prompts, responses, pad=0), dtype=torch.float64)
    torch.testing.assert_close(right, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_it_is_the_positions_that_make_padding_harmless(models, name):
    """With the model's default positions 0, 1, 2, ... a row with padding inside it reads other log-probs."""
    model = models[name]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 300, (n,), generator=g) for n in (3, 14)]
    responses = [torch.randint(1, 300, (n,), generator=g) for n in (12, 12)]
    expected = torch.tensor([naive_logp(model, p, r) for p, r in zip(prompts, responses)], dtype=torch.float64)
    right = torch.tensor(right_padded_logps(model, prompts, responses, pad=0), dtype=torch.float64)
    wrong = torch.tensor(right_padded_logps(model, prompts, responses, pad=0, positions=False), dtype=torch.float64)
    torch.testing.assert_close(right, expected, rtol=1e-6, atol=1e-5)
    assert abs(wrong[0] - expected[0]) > 1e-3  # row 0 has 11 pads between its prompt and its response
    assert abs(wrong[1] - expected[1]) < 1e-5  # row 1 has none


def test_sequence_logps_do_not_depend_on_the_pad_token(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 300, (n,), generator=g) for n in (2, 9, 5)]
    responses = [torch.randint(1, 300, (n,), generator=g) for n in (7, 1, 4)]
    with torch.no_grad():
        a = sequence_logps(model, collate(prompts, responses, pad_token_id=0))
        b = sequence_logps(model, collate(prompts, responses, pad_token_id=17))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- one training step


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_optimiser_step_raises_the_margin(tiny_model_path, optimizer):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    demos = [Response(p, torch.randint(3, 300, (6,), generator=g), 0.0, False, DEMO) for p in range(3)]
    store = SampleStore([torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 7, 5)], demos)
    samples = [Response(p, torch.randint(3, 300, (n,), generator=g), 0.0, False, 0) for p in range(3) for n in (3, 8)]
    store.add_iteration(samples)
    batch = collate_pairs(PairSampler(store, seed=0).sample(6), store, pad_token_id=0)
    with torch.no_grad():
        batch.ref_logps = sequence_logps(policy, batch)  # the reference is the policy before the step
    B = len(batch.kinds)
    loss_fn = DittoActorLoss(beta=0.1)

    def margin_and_loss():
        logps = sequence_logps(policy, batch)
        loss, metrics = loss_fn(logps[:B], logps[B:], batch.ref_logps[:B], batch.ref_logps[B:], batch.kinds)
        return metrics["margin"], loss

    before, loss = margin_and_loss()
    assert before == pytest.approx(0.0, abs=1e-6)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(policy.parameters(), lr=1e-2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, loss_after = margin_and_loss()
    assert after > before + 1e-3
    assert loss_after.item() < loss.item()


def test_on_pairs_reads_the_pair_batch_layout():
    """on_pairs: rows [0, B) chosen, [B, 2B) rejected, reference log-probs, kinds and demo flags from the batch."""
    from openrlhf_ditto.pairs import PairBatch

    g = torch.Generator().manual_seed(3)
    B = 5
    batch = PairBatch(
        sequences=torch.zeros(2 * B, 4, dtype=torch.long),
        attention_mask=torch.ones(2 * B, 4, dtype=torch.long),
        action_mask=torch.rand(2 * B, 3, generator=g) > 0.3,
        ref_logps=-torch.rand(2 * B, generator=g) * 10,
        kinds=torch.tensor([0, 1, 2, 0, 1]),
        chosen_is_demo=torch.tensor([True, True, False, True, True]),
        truncated=torch.zeros(2 * B, dtype=torch.bool),
    )
    batch.action_mask[:, 0] = True
    logps = -torch.rand(2 * B, generator=g) * 10
    loss_fn = DittoActorLoss(beta=0.1, nll_coef=0.3)
    loss, metrics = loss_fn.on_pairs(logps, batch)
    expected, expected_metrics = loss_fn(
        logps[:B], logps[B:], batch.ref_logps[:B], batch.ref_logps[B:], batch.kinds,
        batch.action_mask[:B].sum(-1), batch.chosen_is_demo, rejected_lengths=batch.action_mask[B:].sum(-1),
    )  # fmt: skip
    assert torch.equal(loss, expected) and metrics == expected_metrics
    assert metrics["replay/count"] == 2 and "demo_nll" in metrics
