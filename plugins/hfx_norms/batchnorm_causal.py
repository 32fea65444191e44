"""Causal BatchNorm: training statistics at position t use only positions <= t (and the whole batch).

hfx's ``batchnorm`` pools every position of the batch, so in a causal LM the training-mode
normalisation of an early token already depends on later tokens. Here the statistics of position
``t`` are cumulative: mean and biased variance over the real tokens of every sequence of the
batch at positions ``0..t`` (over all processes when ``torch.distributed`` is initialised), so no
output ever depends on a later position, in training as in eval.

- **Too few tokens**: a position whose cumulative count of real tokens is below
  ``batchnorm_causal_min_tokens`` (at least 2: a variance needs two values; the first position of a
  batch of one sequence has one) is normalised with the running statistics instead.
- **Running statistics** are updated from the full batch (all real tokens, like ``batchnorm``), with
  the unbiased variance and ``batchnorm_momentum``, and used in eval mode.
- Padding, fp32 statistics, checkpoint replay, frozen (LoRA) behaviour: as ``batchnorm``.

Early positions are normalised with few tokens, so their statistics are noisy and differ from the
running ones: the remaining train/eval gap is measured by ``examples/compare_norms.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hfx.registry import Component
from hfx_norms.batchnorm import MIN_TOKENS, SequenceBatchNorm, _all_reduce_sum, _in_backward_replay
from hfx_norms.batchnorm import validate as validate_batchnorm


def _global_position_sums(sums: torch.Tensor) -> torch.Tensor:
    """(T, k) per-position sums added over processes, as (T_max, k): shards may differ in length (padded to the longest)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return sums
    length = torch.tensor([sums.shape[0]], device=sums.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    padded = torch.nn.functional.pad(sums, (0, 0, 0, int(length.item()) - sums.shape[0]))
    return _all_reduce_sum(padded)


class CausalSequenceBatchNorm(SequenceBatchNorm):
    """BatchNorm whose training statistics at each position are cumulative over earlier positions."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, momentum: float = 0.1, min_tokens: int = MIN_TOKENS):
        super().__init__(hidden_size, eps=eps, momentum=momentum)
        self.min_tokens = min_tokens

    def cumulative_statistics(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None):
        """Per position t (fp32, (T', H)): mean and biased variance over real tokens at positions <= t; counts (T',).

        T' is the longest sequence length over processes (T in one process): its last row holds the whole
        global batch's statistics.

        Accumulated around the running mean, a constant shift that leaves the result unchanged and keeps
        the fp32 difference ``E[x^2] - E[x]^2`` away from cancellation once the running mean is good.
        """
        shift = self.running_mean.detach().float().clone()
        x = hidden_states.float() - shift
        if padding_mask is None:
            weights = x.new_ones(x.shape[:2])
        else:
            weights = padding_mask.to(device=x.device, dtype=torch.float32)
        x = x * weights.unsqueeze(-1)
        per_position = torch.cat([x.sum(0), (x * x).sum(0), weights.sum(0).unsqueeze(-1)], dim=-1)
        totals = _global_position_sums(per_position).cumsum(0)
        hidden = x.shape[-1]
        count = totals[:, -1:]
        mean = totals[:, :hidden] / count.clamp(min=1.0)
        var = (totals[:, hidden : 2 * hidden] / count.clamp(min=1.0) - mean * mean).clamp(min=0.0)
        return mean + shift, var, count.squeeze(-1)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and not self.frozen):
            return self._normalise(hidden_states, self.running_mean, self.running_var)
        if padding_mask is not None:
            real = padding_mask.to(device=hidden_states.device, dtype=torch.bool).unsqueeze(-1)
            hidden_states = torch.where(real, hidden_states, torch.zeros_like(hidden_states))
        mean, var, count = self.cumulative_statistics(hidden_states, padding_mask)
        length = hidden_states.shape[1]
        # The fallback uses the statistics of earlier steps: after this step's update they would hold later positions.
        running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
        if not _in_backward_replay():
            # The last position's cumulative statistics are the full batch's.
            total = count[-1]
            unbiased_ok = total >= MIN_TOKENS
            self._update_running(mean[-1].detach(), var[-1].detach(), total.detach(), unbiased_ok)
        mean, var, count = mean[:length], var[:length], count[:length]
        usable = (count >= self.min_tokens).unsqueeze(-1)
        mean = torch.where(usable, mean, running_mean)
        var = torch.where(usable, var, running_var)
        return self._normalise(hidden_states, mean, var)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", min_tokens={self.min_tokens}"


def build(config, hidden_size: int) -> nn.Module:
    return CausalSequenceBatchNorm(hidden_size, eps=config.batchnorm_eps, momentum=config.batchnorm_momentum,
                                   min_tokens=config.batchnorm_causal_min_tokens)


def validate(config) -> None:
    validate_batchnorm(config)
    value = config.batchnorm_causal_min_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_TOKENS:
        raise ValueError(f"batchnorm_causal_min_tokens={value!r} is invalid; valid values: an integer >= {MIN_TOKENS}.")


COMPONENT = Component(
    kind="norm",
    name="batchnorm_causal",
    factory=build,
    description="BatchNorm with cumulative (position <= t) training statistics over real tokens; causal in training.",
    config_defaults={"batchnorm_momentum": 0.1, "batchnorm_eps": 1e-5, "batchnorm_causal_min_tokens": MIN_TOKENS},
    validate_config=validate,
)
