import codecs
import contextlib
import io

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(folder) -> None:
    """Save a tiny random Llama (2 layers, hidden 128, head_dim 64: the smallest that vLLM's CPU build runs) and a
    byte-level BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    text = codecs.decode(this.s, "rot13")  # a little local English text for the tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([text] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", chat_template=CHATML
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def reward_model(tiny_model_path, tmp_path_factory):
    """The tiny model as a reward model (a score head, no language-model head), as OpenRLHF's train_rm saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-model")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny_model_path):
    """The tiny model in eval mode (fp32), loaded once per test module."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matmuls are far too small for threads: one thread is faster, and immune to busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory) -> dict:
    """Every model family's stand-in (tests/families.py), built once per session: {name: folder}."""
    from families import FAMILIES, build_family
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


@pytest.fixture(params=["mistral-legacy", "mistral", "llama3", "qwen2.5", "gemma"])
def family(request, family_paths):
    """One family at a time: (its conventions as families.SPECS states them, its model folder)."""
    from families import SPECS

    return SPECS[request.param], family_paths[request.param]
