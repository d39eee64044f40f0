import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from openrlhf_ditto.backends.sampling import sample_responses

PAD = 0
PROMPTS = [torch.tensor([5, 6, 7, 8, 9, 10, 11]), torch.tensor([12, 13]), torch.tensor([40, 41, 42, 43])]


def greedy_generate(model, prompts, eos, max_new_tokens):
    """HF's greedy `generate` on the left-padded prompts, each row cut after its first EOS."""
    P = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((P - len(p),), PAD), p]) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=(torch.arange(P) >= P - torch.tensor([len(p) for p in prompts])[:, None]).long(),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=eos,
    )[:, P:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def test_tiny_top_p_is_greedy_and_matches_generate_with_padding_and_eos(model):
    # top_p = 1e-9 keeps only the most likely token, so the sampler must retrace HF's greedy search exactly
    free = greedy_generate(model, PROMPTS, eos=-1, max_new_tokens=12)
    eos = free[0][4]  # a token the first prompt emits mid-way: that row stops early, leaves the batch, others go on
    expected = greedy_generate(model, PROMPTS, eos=eos, max_new_tokens=12)
    assert expected[0][-1] == eos and len(expected[0]) <= 5
    assert any(len(r) == 12 and eos not in r for r in expected)
    got = sample_responses(model, PROMPTS, 2, PAD, [eos], 12, temperature=1.0, top_p=1e-9)
    assert got == [[r, r] for r in expected]


def test_samples_are_valid_and_reproducible(model):
    torch.manual_seed(1)
    free = [r for s in sample_responses(model, PROMPTS, 5, PAD, [], 10, temperature=0.3) for r in s]
    # a token one sample emits: with it as EOS, the same seed ends that sample there and, as no other row leaves the
    # batch, draws every other sample as before, to max_new_tokens
    eos = next(t for r in free for t in r if sum(t in x for x in free) == 1)
    kwargs = dict(n=5, pad_token_id=PAD, eos_token_ids=[eos], max_new_tokens=10, temperature=0.3)
    torch.manual_seed(1)
    first = sample_responses(model, PROMPTS, **kwargs)
    torch.manual_seed(1)
    assert sample_responses(model, PROMPTS, **kwargs) == first
    assert sample_responses(model, PROMPTS, **kwargs) != first
    assert [len(s) for s in first] == [5, 5, 5]
    flat = [r for s in first for r in s]
    for r in flat:  # EOS ends a response; a response without it ran to max_new_tokens
        assert eos not in r[:-1] and (r[-1] == eos or len(r) == 10)
    assert any(r[-1] == eos for r in flat) and any(len(r) == 10 and r[-1] != eos for r in flat)
    assert model.training is False


@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(0.05, 0.5, -1), (0.05, 0.9, -1), (1.0, 0.9, -1), (0.1, 1.0, -1), (1.0, 1.0, 50), (1.0, 1.0, 3), (1.0, 0.9, 50)],
)
def test_first_token_follows_hf_temperature_top_k_and_top_p(model, temperature, top_p, top_k):
    # (1.0, 0.9, -1): the nucleus is larger than the top-k candidates, so the sampler sorts the vocabulary;
    # top_k 50 is what the official DITTO code samples with (transformers' default), then top_p as HF orders them
    prompt = PROMPTS[0]
    logits = model(prompt[None]).logits[:, -1] / temperature
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(prompt[None], logits)
    expected = TopPLogitsWarper(top_p)(prompt[None], logits).softmax(-1)[0]
    torch.manual_seed(0)
    n = 20000
    drawn = sample_responses(model, [prompt], n, PAD, [], 1, temperature, top_p, top_k)[0]
    firsts = torch.tensor([r[0] for r in drawn])
    freq = torch.bincount(firsts, minlength=len(expected)) / n
    assert bool((freq[expected == 0] == 0).all())  # never outside the top-k and the nucleus
    assert (freq - expected).abs().sum() / 2 < 0.05 + (expected > 0).sum() / n  # total variation, for the noise


def test_peft_model_with_lora_adapter(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.train()
    torch.manual_seed(0)
    out = sample_responses(peft, PROMPTS, 3, PAD, [2], 6)
    assert [len(s) for s in out] == [3, 3, 3] and all(0 < len(r) <= 6 for s in out for r in s)
    assert peft.training  # the mode is restored


def test_every_eos_of_the_generation_config_ends_a_sample(tiny_model_path, tmp_path, model):
    """A model whose generation_config lists two EOS ids (as Qwen2.5-Instruct does) stops on either, and a sample
    ending with the second one is finished, not truncated."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from openrlhf_ditto.experience import DittoExperienceMaker
    from openrlhf_ditto.models import eos_token_ids
    from openrlhf_ditto.store import SampleStore

    free = greedy_generate(model, PROMPTS, eos=-1, max_new_tokens=12)
    k = next(i for i in range(1, 12) if free[0][i] not in free[0][:i])
    second = free[0][k]  # a token the first prompt emits greedily, first at position k: the model's second EOS
    folder = tmp_path / "two_eos"
    shutil.copytree(tiny_model_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = [tokenizer.eos_token_id, second]
    config.save_pretrained(folder)

    eos = eos_token_ids(folder, tokenizer)
    assert eos == {tokenizer.eos_token_id, second}
    [[got]] = sample_responses(model, PROMPTS[:1], 1, PAD, eos, 12, top_p=1e-9)
    assert got == free[0][: k + 1]
    store = SampleStore.from_demos([PROMPTS[0].tolist()], [[5, tokenizer.eos_token_id]], [False])
    no_reference = lambda batches, runs: torch.zeros(sum(len(b.sequences) for b in batches))  # noqa: E731
    maker = DittoExperienceMaker(store, None, no_reference, PAD, eos)
    stats = maker.make_experience([[got, free[0][:k]]])
    assert [s.truncated for s in store.iterations[0][0]] == [False, True]
    assert stats["samples/truncated_rate"] == 0.5


def test_train_and_eval_sample_with_top_k_50_unless_told(tiny_model_path, monkeypatch):
    """--rollout.top_k reaches our sampler from train's local backend and from eval; its default is the official
    DITTO code's top-k 50 (transformers' default, which it samples with at temperature 1)."""
    from openrlhf_ditto import evaluate
    from openrlhf_ditto.backends import local
    from openrlhf_ditto.cli.args import hierarchize
    from openrlhf_ditto.cli.main import build_parser

    seen = []

    def sampler(model, prompts, n, pad, eos, max_new_tokens, temperature, top_p, top_k, *rest, **kwargs):
        seen.append(top_k)
        return [[[2]] * n for _ in prompts]

    monkeypatch.setattr(local, "sample_responses", sampler)
    monkeypatch.setattr(evaluate, "sample_responses", sampler)
    train = ["train", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", "d.jsonl"]
    for flags in ([], ["--rollout.top_k", "-1"]):
        args = hierarchize(build_parser().parse_args([*train, "--rollout.engine", "torch", *flags]))
        backend = local.LocalBackend(tiny_model_path, args)
        backend.add_run("")
        backend.generate([torch.tensor([5, 6])], 2, [""], [0])
    eval_args = hierarchize(build_parser().parse_args(["eval", "--run", "r", "--data.dataset", "d.jsonl"]))
    sampling = dict(n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=7, seed=0, engine="torch")
    sampling["param_dtype"] = None
    evaluate._generate(str(tiny_model_path), ["Beautiful is"], sampling, 1, None)
    assert seen == [50, -1, 7] and eval_args.rollout.top_k == 50
