"""Batched sampling for the local backend: every prompt x n samples in one pass with the KV cache."""

import torch

from openrlhf_ditto.pairs import collate


@torch.no_grad()
def sample_responses(
    model,
    prompts: list[torch.Tensor],
    n: int,
    pad_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[list[int]]]:
    """n sampled responses per prompt, as token ids that end with EOS, or without one when the sample reached
    max_new_tokens (then it is truncated). Uses torch's global RNG, so a seeded run samples the same."""
    device = next(model.parameters()).device
    batch = collate(prompts, [p[:0] for p in prompts], pad_token_id).to(device)
    P = batch.sequences.shape[1]
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )[:, P:].tolist()
    model.train(was_training)
    responses = []
    for row in out:
        end = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        responses.append(row[:end])
    return [responses[i * n : (i + 1) * n] for i in range(len(prompts))]
