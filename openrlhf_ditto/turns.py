"""How a model ends an assistant turn: one rule for every model family, read from its own chat template.

Llama-3 ends a turn with <|eot_id|> while its eos_token is <|end_of_text|>; Gemma with <end_of_turn> (eos <eos>);
Qwen2.5 and ChatML models with <|im_end|>; Mistral and Llama-2 with their eos </s>. Rather than a table of
families, the chat template is asked: the end of a turn is the first special token it writes after an assistant
message. A demo ends with that token, so that it ends exactly as a finished sample does, and sampling stops on it.
Runs without a chat template (plain prompts, --data.input_template) and templates that write no special token after
an assistant message end a response with the tokenizer's EOS.
"""

from transformers import PreTrainedTokenizerBase

_SENTINEL = "ditto-sentinel-7c1e"  # an assistant message whose rendering is found in the template's output


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token id the chat template puts after an assistant message; the EOS without a template or such a token."""
    if tokenizer.chat_template:
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # a template that refuses this conversation (jinja's raise_exception) tells nothing
            text = ""
        if _SENTINEL in text:
            special = set(tokenizer.all_special_ids) | {
                i for i, token in tokenizer.added_tokens_decoder.items() if token.special
            }
            after = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
            for token in after:
                if token in special:
                    return token
    return tokenizer.eos_token_id
