"""PowerNorm (Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers").

BatchNorm fails in transformers, the paper argues, because batch statistics of NLP activations
fluctuate strongly and their gradients with them. PowerNorm therefore

- drops the mean subtraction and scales each feature by a quadratic mean, ``psi^2 = mean(x^2)``;
- normalises with the *running* quadratic mean of the previous steps, in training as in eval
  (``z_t = x_t / psi_{t-1}``, then ``psi_t^2 = psi_{t-1}^2 + (1 - alpha_fwd) (mean_batch(x_t^2) - psi_{t-1}^2)``);
- replaces the gradient through the running statistic (which would reach back into every earlier
  batch) by a running correction ``nu``: ``dL/dx_t = (g_t - nu_{t-1} z_t) / psi_{t-1}`` with
  ``g_t = weight * dL/dy_t``, then ``nu_t = nu_{t-1} (1 - (1 - alpha_bkw) Gamma_t) + (1 - alpha_bkw) Lambda_t``,
  ``Gamma_t = mean(z_t^2)``, ``Lambda_t = mean(g_t z_t)`` (the paper's Algorithm 1);
- warms up: for the first ``powernorm_warmup_steps`` training batches the forward divides by the
  current batch's quadratic mean (the backward keeps the approximate formula) and the running
  statistic is the cumulative average of those batches, so it starts from a real estimate rather
  than its initial 1 (as the authors' implementation does).

The authors' released implementation first divides each token by its quadratic mean over groups of
channels ("group scaling", a per-token RMSNorm without weight when there is one group), then applies
the algorithm above. ``powernorm_group_scaling`` is that number of groups: 1 by default, 0 for
Algorithm 1 alone. Gradients flow through the group scaling exactly (it is per token). In hfx's
pre-norm models, whose residual stream starts near the embeddings' 0.02 scale, it matters a lot
(see the norms documentation for measured numbers).

hfx additions: every mean is over real tokens only (``padding_mask``), over all processes when
``torch.distributed`` is initialised; statistics are fp32 under bf16/fp16; the forward replayed by
gradient checkpointing reuses the step's scale and updates nothing; frozen affine parameters
(LoRA/QLoRA) mean the running statistic is used and kept, as for hfx's batchnorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hfx.registry import Component
from hfx_norms.batchnorm import _all_reduce_sum as _global_sum  # inside autograd.Function: no graph either way
from hfx_norms.batchnorm import _in_backward_replay


class _PowerNormFunction(torch.autograd.Function):
    """``y = weight * x / scale + bias`` with the paper's approximate backward for ``x`` (exact for weight, bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, real, norm):
        z = x / scale
        ctx.save_for_backward(z, weight, scale, real)
        ctx.norm = norm  # its nu is read, then advanced, when this backward runs
        return z * weight + bias

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight, scale, real = ctx.saved_tensors
        norm = ctx.norm
        g = grad_out * weight
        nu = norm.running_nu.to(z.dtype)
        grad_x = (g - nu * z) / scale * real if ctx.needs_input_grad[0] else None
        norm._advance_nu(g, z, real)
        grad_weight = (grad_out * z).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


class PowerNorm(nn.Module):
    """PowerNorm over the feature axis of (batch, seq, hidden) activations, pooling real tokens."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 warmup_steps: int = 100, group_scaling: int = 1):
        super().__init__()
        if group_scaling < 0 or (group_scaling and hidden_size % group_scaling):
            raise ValueError(f"powernorm_group_scaling={group_scaling!r} is invalid; valid values: 0 or a divisor of "
                             f"hidden_size={hidden_size}.")
        self.group_scaling = group_scaling
        self.eps = eps
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.warmup_steps = warmup_steps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        # psi^2 (running mean of x^2), nu (backward correction), and the count of batches that updated them.
        self.register_buffer("running_phi", torch.ones(hidden_size, dtype=torch.float32))
        self.register_buffer("running_nu", torch.zeros(hidden_size, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._step_scale: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # A cast to bf16/fp16 must not round the statistics (and every later update of them).
        super()._apply(fn, recurse)
        for name in ("running_phi", "running_nu"):
            buffer = getattr(self, name)
            if buffer.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buffer.float())
        return self

    def hfx_init_weights(self, config) -> None:
        from transformers import initialization as init

        init.ones_(self.running_phi)
        init.zeros_(self.running_nu)
        init.zeros_(self.num_batches_tracked)

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to(dtype)
        if not self.training or self.frozen:
            x = self._scale_groups(x) if self.group_scaling else x
            out = x * torch.rsqrt(self.running_phi.to(dtype) + self.eps) * self.weight.to(dtype) + self.bias.to(dtype)
            return out.reshape(shape).to(hidden_states.dtype)
        if padding_mask is None:
            real = x.new_ones(x.shape[0], 1)
        else:
            real = padding_mask.reshape(-1, 1).to(device=x.device, dtype=dtype)
            # Zeroed first, so inf/nan in pad positions reach neither the statistics nor any gradient.
            x = torch.where(real.bool(), x, torch.zeros_like(x))
        if self.group_scaling:
            x = self._scale_groups(x)
        if _in_backward_replay() and self._step_scale is not None:
            scale = self._step_scale  # checkpointing's recomputation must see what the step's forward saw
        else:
            scale = self._scale_and_update(x, real)
            self._step_scale = scale
        out = _PowerNormFunction.apply(x, self.weight.to(dtype), self.bias.to(dtype), scale.to(dtype), real, self)
        return out.reshape(shape).to(hidden_states.dtype)

    def _scale_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Each token divided by its quadratic mean over each group of channels (ordinary autograd)."""
        groups = x.reshape(x.shape[0], self.group_scaling, -1)
        return (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(x.shape)

    @torch.no_grad()
    def _scale_and_update(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The divisor of this step (batch statistic in warmup, else psi_{t-1}); then psi advances.

        Decided on tensors (no host sync). A batch without real tokens uses the running statistic and
        leaves it, and the step count, unchanged.
        """
        hidden = x.shape[-1]
        totals = _global_sum(torch.cat([(x * x * real).sum(0), real.sum().reshape(1)]))  # x: fp32 or wider
        count = totals[-1]
        usable = count > 0
        batch_phi = totals[:hidden] / count.clamp(min=1.0)
        warming = self.num_batches_tracked < self.warmup_steps
        phi = torch.where(warming & usable, batch_phi, self.running_phi)
        steps = self.num_batches_tracked.to(x.dtype)
        rate = torch.where(warming, 1.0 / (steps + 1.0), torch.tensor(1.0 - self.alpha_fwd, dtype=x.dtype, device=x.device))
        self.running_phi.lerp_(batch_phi.to(self.running_phi.dtype), (rate * usable).to(self.running_phi.dtype))
        self.num_batches_tracked += usable.to(self.num_batches_tracked.dtype)
        return torch.sqrt(phi + self.eps)

    @torch.no_grad()
    def _advance_nu(self, g: torch.Tensor, z: torch.Tensor, real: torch.Tensor) -> None:
        """nu_t = nu_{t-1} (1 - (1 - alpha_bkw) Gamma_t) + (1 - alpha_bkw) Lambda_t, over real tokens."""
        hidden = z.shape[-1]
        totals = _global_sum(torch.cat([(g * z * real).sum(0), (z * z * real).sum(0), real.sum().reshape(1)]))
        count = totals[-1]
        lam = totals[:hidden] / count.clamp(min=1.0)
        gam = totals[hidden : 2 * hidden] / count.clamp(min=1.0)
        rate = (1.0 - self.alpha_bkw) * (count > 0).to(totals.dtype)
        nu = self.running_nu.to(totals.dtype)
        self.running_nu.copy_(nu * (1.0 - rate * gam) + rate * lam)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"warmup_steps={self.warmup_steps}, group_scaling={self.group_scaling}")


def build(config, hidden_size: int) -> nn.Module:
    return PowerNorm(hidden_size, eps=config.powernorm_eps, alpha_fwd=config.powernorm_alpha_fwd,
                     alpha_bkw=config.powernorm_alpha_bkw, warmup_steps=config.powernorm_warmup_steps,
                     group_scaling=config.powernorm_group_scaling)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config) -> None:
    for name in ("powernorm_alpha_fwd", "powernorm_alpha_bkw"):
        value = getattr(config, name)
        if not (_number(value) and 0.0 <= value < 1.0):
            raise ValueError(f"{name}={value!r} is invalid; valid values: a number in [0, 1) (paper default 0.9).")
    if not (_number(config.powernorm_eps) and config.powernorm_eps > 0):
        raise ValueError(f"powernorm_eps={config.powernorm_eps!r} is invalid; valid values: a finite number > 0.")
    steps = config.powernorm_warmup_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"powernorm_warmup_steps={steps!r} is invalid; valid values: an integer >= 0.")
    groups = config.powernorm_group_scaling
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0 or (groups and config.hidden_size % groups):
        raise ValueError(f"powernorm_group_scaling={groups!r} is invalid; valid values: 0 (off) or a divisor of "
                         f"hidden_size={config.hidden_size}.")


COMPONENT = Component(
    kind="norm",
    name="powernorm",
    factory=build,
    description="PowerNorm: running quadratic mean (no centring), approximate backward, warmup (Shen et al. 2020).",
    config_defaults={"powernorm_alpha_fwd": 0.9, "powernorm_alpha_bkw": 0.9, "powernorm_warmup_steps": 100,
                     "powernorm_eps": 1e-5, "powernorm_group_scaling": 1},
    validate_config=validate,
)
