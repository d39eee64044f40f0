"""Offline stand-ins of the model families users train, built to their real tokenizers' and chat templates'
conventions: tiny random Llama-architecture models (hidden 128, 2 heads of dim 64, 1 KV head, 2 layers; vLLM's CPU
build refuses head_dim 16) with tokenizers trained here on local text (the Zen of Python and a few stdlib
docstrings). Nothing is downloaded. `build_family(name, folder)` writes one as a Hugging Face folder; the fixtures
in conftest.py build each once per test session: 0.05-0.15 s a family, after the first build's imports (3 s on a
quiet machine).

    mistral-legacy  Mistral-7B-Instruct-v0.2 / Llama-2 in a folder written before transformers 5: a SentencePiece BPE
                    model (`sentencepiece`, add_dummy_prefix, byte fallback, <unk>/<s>/</s> = 0/1/2) with the old
                    tokenizer.json (normalizer Prepend("▁") + Replace(" ", "▁")) and "legacy": true, which
                    transformers 5 loads as Metaspace(prepend_scheme="always"): text tokenized on its own, and text
                    after a special token, starts with "▁" ("<s>[INST]" decodes as "<s> [INST]"). Template:
                    "<s>[INST] ... [/INST]answer</s>", no system role; the eos </s> ends a turn.
    mistral         the same SentencePiece model converted by transformers 5 from tokenizer.model (Metaspace
                    prepend_scheme="first": "▁" only at the very start of a text that has none).
    llama3          Llama-3-Instruct: byte-level BPE with Llama-3's pre-tokenizer regex, <|begin_of_text|> added as
                    BOS, header tokens; <|eot_id|> ends a turn while eos_token is <|end_of_text|> (the original
                    release), generation_config eos_token_id lists both; no pad token.
    qwen2.5         Qwen2.5-Instruct: byte-level BPE with Qwen2's regex, ChatML with its default system prompt,
                    no BOS; eos_token <|im_end|>, pad <|endoftext|>, generation_config eos_token_id
                    [<|im_end|>, <|endoftext|>].
    gemma           Gemma-1.1/2-it: SentencePiece BPE without the dummy prefix, <pad>/<eos>/<bos>/<unk> = 0/1/2/3,
                    <start_of_turn>/<end_of_turn> pieces, BOS added; "model" turns, no system role; eos_token <eos>,
                    <end_of_turn> ends a turn, generation_config eos_token_id [<eos>, <end_of_turn>] (Gemma's
                    [1, 107]).
"""

import codecs
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("mistral-legacy", "mistral", "llama3", "qwen2.5", "gemma")

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """What a test may rely on: the tokens that end an assistant turn and a response, by their text."""

    name: str
    end_of_turn: str  # the token the chat template puts after an assistant message
    eos: str  # tokenizer.eos_token
    stops: tuple[str, ...]  # every token sampling stops on (eos, generation_config's list, the turn end)
    bos: str | None  # the template's BOS, None if it has none


SPECS = {
    "mistral-legacy": Family("mistral-legacy", "</s>", "</s>", ("</s>",), "<s>"),
    "mistral": Family("mistral", "</s>", "</s>", ("</s>",), "<s>"),
    "llama3": Family(
        "llama3", "<|eot_id|>", "<|end_of_text|>", ("<|end_of_text|>", "<|eot_id|>"), "<|begin_of_text|>"
    ),
    "qwen2.5": Family("qwen2.5", "<|im_end|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), None),
    "gemma": Family("gemma", "<end_of_turn>", "<eos>", ("<eos>", "<end_of_turn>"), "<bos>"),
}


def local_text() -> list[str]:
    """Some English from the Python installation itself, one line a sentence."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    import argparse
    import collections
    import difflib
    import json as json_module
    import textwrap

    docs = [m.__doc__ for m in (argparse, collections, difflib, json_module, textwrap)]
    text = "\n".join([codecs.decode(this.s, "rot13"), *docs])
    return [line for line in text.splitlines() if line.strip()]


def _sentencepiece(folder: Path, dummy_prefix: bool, ids: dict[str, int], symbols: list[str]) -> None:
    """Train a SentencePiece BPE model (byte fallback, as Mistral, Llama-2 and Gemma) into folder/tokenizer.model."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(local_text()),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=dummy_prefix,
        split_digits=True,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=symbols,
        minloglevel=2,
        **ids,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def _byte_level_bpe(pattern: str, specials: list[str], bos: str | None):
    """A byte-level BPE as Llama-3 and Qwen2 build theirs: a regex split, then bytes; BOS added when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(local_text(), trainer=trainer)
    if bos is not None:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    return bpe


def build_tokenizer(name: str, folder: Path):
    """The family's tokenizer, saved in `folder` as its Hub folder has it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if name in ("mistral", "mistral-legacy"):
        _sentencepiece(folder, True, dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), [])
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        config["add_bos_token"] = True
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(folder)  # transformers 5 converts tokenizer.model
        if name == "mistral-legacy":
            from tokenizers import normalizers

            backend = tokenizer.backend_tokenizer
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            backend.pre_tokenizer = None
            (folder / "tokenizer.model").unlink()
            backend.save(str(folder / "tokenizer.json"))
            (folder / "tokenizer_config.json").write_text(
                json.dumps({**config, "legacy": True, "chat_template": MISTRAL_TEMPLATE})
            )
            return AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = MISTRAL_TEMPLATE
    elif name == "gemma":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
        _sentencepiece(folder, False, ids, ["<start_of_turn>", "<end_of_turn>"])
        config = {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": True,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        (folder / "tokenizer.model").unlink()
        tokenizer.chat_template = GEMMA_TEMPLATE
    elif name == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(LLAMA3_REGEX, specials, "<|begin_of_text|>"),
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            additional_special_tokens=specials[2:],
            chat_template=LLAMA3_TEMPLATE,
            clean_up_tokenization_spaces=True,  # as Llama-3's tokenizer_config.json has it
        )
    elif name == "qwen2.5":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(QWEN_REGEX, specials, None),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=specials[1:],
            chat_template=QWEN_TEMPLATE,
            clean_up_tokenization_spaces=False,
        )
    else:
        raise ValueError(f"unknown family {name}; one of {FAMILIES}")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_family(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write family `name`'s stand-in (random weights from `seed`, tokenizer, chat template, generation config)
    into `folder` as a Hugging Face model folder; returns the folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer(name, folder)
    spec = SPECS[name]
    ids = tokenizer.convert_tokens_to_ids
    stops = [ids(t) for t in spec.stops]
    bos = ids(spec.bos) if spec.bos else None
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=bos,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    return folder
