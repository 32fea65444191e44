"""Reformer-style LSH attention: tokens are sorted by a locality-sensitive hash and attend within chunks.

Semantics (Reformer's, with transformers' config names):

- each of ``num_hashes`` rounds hashes every key with random rotations R (per head, ``(head_dim,
  num_buckets/2)``): bucket = argmax([kR, -kR]); ``num_buckets`` is a power of two (``None``: about
  2 * seq_len / chunk, as Reformer picks it); padded keys go to an extra last bucket;
- tokens are stably sorted by (round, bucket, position); the sorted sequence is cut into chunks of
  ``lsh_attn_chunk_length``; each chunk's queries attend to the keys of the chunk itself,
  ``lsh_num_chunks_before`` chunks before and ``lsh_num_chunks_after`` after (circularly, as Reformer);
- masked keys (padding; causal: later positions) score -1e9 instead of being removed, as in Reformer;
  ``lsh_exclude_self=True`` gives a token's own key -1e5 (Reformer's rule for tied query/key projections);
- the rounds are combined with weights softmax over rounds of each round's log-sum-exp; both softmaxes
  subtract the maximum, so a query whose only admissible key is itself gets exactly its own value
  (Reformer's float32 ``exp(x - logsumexp(x))`` is off by up to ~0.5% there, see docs/long-context.md).

Tokens are bucketed by their *key*: with tied query/key projections (Reformer) this is exactly
Reformer's shared-QK hashing, since the bucket of a vector does not change when it is scaled.
Rotations come from ``hash_seed`` (``None``: fresh ones every call, as Reformer does in training), drawn
with the same generator call as Reformer, so equal seeds give equal buckets.
Memory: O(n * num_hashes * chunk * (1 + chunks before + chunks after)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfx.registry import Component

from .common import require_full_sequence, check_positive_int, expand_kv, is_causal, key_padding, padding_mask

NAME = "hfx_lsh"
DEFAULTS = {
    "num_hashes": 1,
    "num_buckets": None,
    "lsh_attn_chunk_length": 64,
    "hash_seed": 0,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "lsh_exclude_self": False,
}


def settings(config) -> dict:
    values = {name: getattr(config, name, default) for name, default in DEFAULTS.items()}
    check_positive_int(values["num_hashes"], "num_hashes", NAME)
    check_positive_int(values["lsh_attn_chunk_length"], "lsh_attn_chunk_length", NAME)
    check_positive_int(values["lsh_num_chunks_before"], "lsh_num_chunks_before", NAME, minimum=0)
    check_positive_int(values["lsh_num_chunks_after"], "lsh_num_chunks_after", NAME, minimum=0)
    buckets = values["num_buckets"]
    if buckets is not None and (
        isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2 or buckets & (buckets - 1)
    ):
        raise ValueError(
            f"{NAME}: num_buckets must be a power of two >= 2 (2, 4, 8, ...) or None for automatic, got {buckets!r}."
        )
    if values["hash_seed"] is not None:
        check_positive_int(values["hash_seed"], "hash_seed", NAME, minimum=0)
    return values


def automatic_buckets(length: int, chunk: int) -> int:
    """About two buckets per chunk, a power of two (Reformer's choice when num_buckets is unset)."""
    return 2 ** max(1, (2 * (length // chunk)).bit_length() - 1)


def rotations(heads: int, head_dim: int, num_hashes: int, num_buckets: int, seed, device, dtype):
    shape = (heads, head_dim, num_hashes, num_buckets // 2)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def hash_buckets(key, keep, num_hashes: int, num_buckets: int, seed) -> torch.Tensor:
    """(B, H, num_hashes, n) bucket of every key in every round; padded keys get the extra bucket num_buckets."""
    heads, head_dim = key.shape[1], key.shape[3]
    rotation = rotations(heads, head_dim, num_hashes, num_buckets, seed, key.device, key.dtype)
    rotated = torch.einsum("bhtd,hdrk->bhrtk", key.detach(), rotation)
    buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    return buckets.masked_fill(~keep[:, None, None, :], num_buckets)


def lsh_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query (B, H, n, d), key/value (B, H_kv, n, d) -> (B, n, H, d), None."""
    s = settings(getattr(module, "config", None))
    causal = is_causal(module, kwargs)
    batch, heads, length, head_dim = query.shape
    require_full_sequence(key, length, NAME)
    keep = key_padding(attention_mask, batch, length, query.device, NAME)
    key, value = expand_kv(query, key, value)
    scaling = head_dim**-0.5 if scaling is None else scaling
    chunk, rounds = s["lsh_attn_chunk_length"], s["num_hashes"]
    padded = -(-length // chunk) * chunk
    num_buckets = s["num_buckets"] or automatic_buckets(padded, chunk)

    query, key, value = (F.pad(x, (0, 0, 0, padded - length)) for x in (query, key, value))
    keep = F.pad(keep, (0, padded - length), value=False)
    buckets = hash_buckets(key, keep, rounds, num_buckets, s["hash_seed"])
    round_offset = (num_buckets + 1) * torch.arange(rounds, device=query.device)[:, None]
    order = torch.sort((buckets + round_offset).flatten(2), dim=-1, stable=True).indices
    positions = order % padded  # (B, H, rounds * padded): token at each sorted slot

    def sort(x):
        return torch.gather(x, 2, positions[..., None].expand(-1, -1, -1, head_dim)).view(batch, heads, -1, chunk, head_dim)

    def around(x):
        """Each chunk next to its neighbours (circular, as Reformer), along the key axis."""
        shifts = range(-s["lsh_num_chunks_before"], s["lsh_num_chunks_after"] + 1)
        return torch.cat([x.roll(-shift, dims=2) for shift in shifts], dim=3)

    q_chunks, k_chunks, v_chunks = sort(query), around(sort(key)), around(sort(value))
    q_pos = positions.view(batch, heads, -1, chunk)
    k_pos = around(q_pos)
    scores = torch.matmul(q_chunks, k_chunks.transpose(-1, -2)) * scaling
    allowed = torch.gather(keep[:, None, :].expand(-1, heads, -1), 2, k_pos.flatten(2)).view(k_pos.shape)
    allowed = allowed[..., None, :]
    if causal:
        allowed = allowed & (k_pos[..., None, :] <= q_pos[..., None])
    half = query.dtype == torch.float16
    scores = scores.masked_fill(~allowed, -1e4 if half else -1e9)
    if s["lsh_exclude_self"]:
        scores = scores.masked_fill(k_pos[..., None, :] == q_pos[..., None], -1e3 if half else -1e5)
    # Normalise with softmax (max subtracted), not exp(scores - logsumexp) as Reformer: a query whose only
    # admissible key is itself has every score at the -1e5 self value, where float32 spacing is 2**-7 (bf16:
    # 512), so the rounded log-sum-exp would leave weights summing to 1 +- 0.4% (bf16: 2 with two copies).
    logits = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=dropout > 0)
    out = torch.matmul(probs, v_chunks).view(batch, heads, rounds * padded, head_dim)

    undo = torch.argsort(order, dim=-1)
    out = torch.gather(out, 2, undo[..., None].expand(-1, -1, -1, head_dim)).view(batch, heads, rounds, padded, head_dim)
    logits = torch.gather(logits.view(batch, heads, -1), 2, undo).view(batch, heads, rounds, padded, 1)
    out = (out * torch.softmax(logits, dim=2)).sum(2)
    return out[:, :, :length].transpose(1, 2), None


def validate(config) -> None:
    settings(config)


COMPONENT = Component(
    kind="attention",
    name=NAME,
    factory=lsh_attention,
    mask_factory=padding_mask,
    description="Reformer LSH: hash-sorted chunks (num_hashes, num_buckets, lsh_attn_chunk_length, hash_seed).",
    config_defaults=DEFAULTS,
    validate_config=validate,
)
