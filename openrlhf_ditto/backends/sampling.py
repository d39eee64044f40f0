"""Batched sampling for the local backend: every prompt x n samples in one pass with the KV cache.

A hand-written decode loop rather than `model.generate(num_return_sequences=n)`, for CPU throughput:
  - each prompt is prefilled once, computing only its last position's logits, and its KV cache is repeated n
    times (generate prefills n copies of it);
  - the KV cache is written into room reserved up front, where HF's DynamicCache concatenates all of it into a
    new tensor in every layer at every step;
  - attention takes the grouped K/V heads as they are (see `_grouped_sdpa`);
  - a token is drawn by inverse CDF, in place on the step's logits: `torch.multinomial` over the vocabulary
    costs about half a forward step on CPU. top_k draws among the k likeliest tokens (`topk`, sorted); top_p < 1
    takes a partial top-k instead of sorting the vocabulary, and sorts only when the nucleus is larger than that;
  - rows that emitted EOS leave the batch once they are an eighth of it (dropping them copies the cache).
"""

import contextlib
from collections.abc import Collection

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from openrlhf_ditto.pairs import collate

_TOP_K = 256  # candidates for the nucleus before falling back to a full sort
_GROUPED_SDPA = "ditto_grouped_sdpa"


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's "sdpa" attention, minus its copy of K and V for every query head whenever there is a mask (always,
    with left padding): that copy of the cache, in every layer at every step, costs as much as the layer's MLP on
    CPU, where torch's kernels take the grouped heads as they are (`enable_gqa`)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal and attention_mask is None and query.shape[2] > 1,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_GROUPED_SDPA, _grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(_GROUPED_SDPA, sdpa_mask)


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers of `capacity` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            B, H, _, _ = key_states.shape
            self.key_buffer = key_states.new_empty(B, H, self.capacity, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
            self.length = 0
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._set_buffers(
            self.key_buffer.repeat_interleave(repeats, 0), self.value_buffer.repeat_interleave(repeats, 0)
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._set_buffers(self.key_buffer[indices], self.value_buffer[indices])

    def _set_buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = keys, values
        self.keys, self.values = keys[:, :, : self.length], values[:, :, : self.length]


def _draw(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the top_k likeliest tokens (-1: all) and
    then to the top_p nucleus of those, as HF's `TopKLogitsWarper` then `TopPLogitsWarper` (and vLLM): a token is
    kept when the probability of the tokens more likely than it is < top_p. `u`: a uniform draw in [0, 1) per row.
    Overwrites `logits`."""
    weights = logits.float().sub_(logits.amax(-1, keepdim=True)).div_(temperature).exp_()  # softmax, unnormalised
    ids = None
    if 0 < top_k < weights.shape[-1]:
        weights, ids = weights.topk(top_k)
    if top_p < 1:
        mass = top_p * weights.sum(-1, keepdim=True)
        if ids is None:
            top, ids = weights.topk(min(_TOP_K, weights.shape[-1]))
            if (top.sum(-1, keepdim=True) < mass).any():  # some nucleus reaches past the top-k
                top, ids = weights.sort(-1, descending=True)
            weights = top
        weights = weights.masked_fill_(weights.cumsum(-1) - weights >= mass, 0)
    cdf = weights.cumsum_(-1)
    u = u.to(cdf.device)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (picked if ids is None else ids.gather(-1, picked)).squeeze(-1)


@torch.inference_mode()
def sample_responses(
    model,
    prompts: list[torch.Tensor],
    n: int,
    pad_token_id: int,
    eos_token_ids: Collection[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seeds: list[int] | None = None,
    route=None,
) -> list[list[list[int]]]:
    """n sampled responses per prompt, as token ids that end with one of `eos_token_ids` (`models.eos_token_ids`),
    or without one when the sample reached max_new_tokens (then it is truncated). Each prompt draws from a generator
    of its own, seeded with its seed in `seeds` (default: drawn from torch's RNG): its samples do not depend on the
    other prompts of the batch. `route(prompts)`, given the prompt of each row of the batch, is a context manager
    for the forwards (the local backend's per-row adapters)."""
    device = next(model.parameters()).device
    if seeds is None:
        seeds = torch.randint(2**31, (len(prompts),)).tolist()
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    route = route or (lambda rows: contextlib.nullcontext())
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
    batch = collate(prompts, [p[:0] for p in prompts], pad_token_id).to(device)
    was_training = model.training
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    attention = base.config._attn_implementation
    if attention == "sdpa":
        base.set_attn_implementation(_GROUPED_SDPA)
    try:
        mask = batch.attention_mask
        capacity = mask.shape[1] + max_new_tokens
        cache = Cache(layer_class_to_replicate=lambda: _PreallocatedLayer(capacity))
        with route(torch.arange(len(prompts))):
            logits = model(
                batch.sequences,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        rows = torch.arange(len(prompts) * n, device=device)  # the sample each batch row belongs to
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        responses: list[list[int]] = [[] for _ in range(len(rows))]
        for step in tqdm(range(max_new_tokens), desc=f"sampling {len(prompts)} prompts x {n}", leave=False):
            u = torch.cat([torch.rand(n, generator=g) for g in generators])  # every prompt's n, while any runs
            tokens = _draw(logits, temperature, top_p, top_k, u[rows.cpu()])
            for r, t, d in zip(rows.tolist(), tokens.tolist(), done.tolist()):
                if not d:
                    responses[r].append(t)
            done |= torch.isin(tokens, eos)
            if step == max_new_tokens - 1 or done.all():
                break
            if done.sum() * 8 >= len(done):
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tokens, mask, done = rows[keep], tokens[keep], mask[keep], done[keep]
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
            with route(rows // n):
                logits = model(
                    tokens.unsqueeze(-1),
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]
    finally:
        model.train(was_training)
        base.set_attn_implementation(attention)
    return [responses[i * n : (i + 1) * n] for i in range(len(prompts))]
