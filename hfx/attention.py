"""Attention backends go through transformers' own door: ``AttentionInterface``.

hfx models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` exactly like Llama does,
so every backend registered there (sdpa, flash, flex, or an hfx plugin) serves hfx models, and
every hfx attention plugin serves stock models that dispatch the same way.

Plugins of kind ``attention`` are registered under their entry-point name at ``import hfx``
through thin lazy shims: the name is known to transformers at once (so
``from_pretrained(..., attn_implementation="hfx_sliding_window")`` validates), while the plugin
module is imported only on first call. A mask function is registered with the same name in
``AttentionMaskInterface``; without it transformers would hand the backend ``attention_mask=None``
and padding would be silently dropped.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from .registry import registry

if TYPE_CHECKING:  # torch is imported where it is used: `import hfx` must stay cheap
    import torch
    from torch import nn


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D) for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    b, h, t, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """softmax(Q K^T * scaling + mask) V in plain torch: the reference every backend is tested against."""
    import torch

    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    return attend(module, scores, value, attention_mask, dropout)


def attend(module: nn.Module, scores: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float = 0.0):
    """softmax(scores + mask) V: (B, H, T, K) scaled scores and (B, H, K, D) values (heads already repeated) to
    the (B, T, H, D) output and the weights. Shared by eager attention and position components that score
    with terms of their own (xl_relative)."""
    import torch
    from torch import nn

    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : value.shape[-2]]
    # softmax subtracts the row maximum internally, the numerically stable form.
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def valid_attention_types() -> list[str]:
    """Every name ``attention_type`` may take: transformers' backends plus installed hfx plugins."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_attention_plugins()
    return sorted({"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys(), *registry.names("attention")})


_REGISTERED: set[tuple[str, str]] = set()


def _lazy_attention(name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        return registry.get("attention", name).factory(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"lazy_{name}"
    return attention


def _lazy_mask(name: str):
    def mask(*args, **kwargs):
        component = registry.get("attention", name)
        if component.mask_factory is None:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)
        return component.mask_factory(*args, **kwargs)

    mask.__name__ = f"lazy_{name}_mask"
    return mask


def register_attention_plugins(module: ModuleType | None = None) -> None:
    """Make every installed attention plugin known to transformers under its entry-point name.

    ``module`` is ``transformers.modeling_utils`` (``AttentionInterface``) or
    ``transformers.masking_utils`` (``AttentionMaskInterface``): ``import hfx`` registers with each
    right after it is imported (see ``hfx.auto_registration``). With no argument, both; names
    already registered are skipped, so calling it again picks up plugins installed since.
    """
    if module is None:
        import transformers.masking_utils
        import transformers.modeling_utils

        targets = [transformers.modeling_utils, transformers.masking_utils]
    else:
        targets = [module]
    for target in targets:
        if target.__name__ == "transformers.masking_utils":
            interface, make, label = target.AttentionMaskInterface, _lazy_mask, "mask"
        else:
            interface, make, label = target.AttentionInterface, _lazy_attention, "attention"
        for name in registry.names("attention"):
            if (label, name) in _REGISTERED:
                continue
            interface.register(name, make(name))
            _REGISTERED.add((label, name))
