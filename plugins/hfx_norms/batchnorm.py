"""BatchNorm for sequences: statistics over the real tokens of the whole (possibly distributed) batch.

What plain ``nn.BatchNorm1d`` gets wrong for transformers, and what this module does instead:

- padding: statistics are taken over real tokens only (``padding_mask``), so whatever sits in
  pad positions cannot change a real token's output (the model derives the mask from a 2-D or a
  4-D attention mask, see ``hfx.padding_masks``);
- too few real tokens: a training batch with fewer than two real tokens in all (an all-padding
  batch, or one token per channel, whose variance is undefined) is normalised with the running
  statistics and leaves them, and ``num_batches_tracked``, unchanged;
- precision: sums are accumulated in fp32 even under bf16/fp16 activations;
- several processes: when ``torch.distributed`` is initialised the (sum, sum of squares, count)
  triple is all-reduced with an autograd-aware collective, so gradients flow through the global
  statistics exactly as in one process on the concatenated batch (``SyncBatchNorm`` refuses CPU/gloo);
- gradient checkpointing: the forward that checkpointing replays during backward does not
  update the running statistics a second time;
- frozen for LoRA/QLoRA: when the affine parameters do not require grad the layer is treated as
  frozen and normalises with its running statistics, which then never move, so an adapter
  checkpoint (which holds no BN buffers) reproduces the trained model exactly.

Causal models: in train mode the batch statistics pool over every position, future ones
included, which leaks a little information about future tokens into the normalisation of past
ones. In eval mode (running statistics) each token is normalised on its own, so incremental
decoding with a KV cache equals a full forward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hfx.registry import Component


def _in_backward_replay() -> bool:
    """True while autograd runs a backward pass, i.e. when checkpointing recomputes a forward."""
    return torch._C._current_graph_task_id() != -1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is the same sum of the incoming gradients.

    Every process's loss depends on the global statistics, so the gradient reaching one process's
    local sums is the total over all processes. (``torch.distributed.nn.functional.all_reduce``
    does this too but is deprecated in torch 2.13 in favour of a private module.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(tensor)
    return tensor


MIN_TOKENS = 2
"""Real tokens a training batch needs (over all processes) for its statistics to be used and recorded."""


class SequenceBatchNorm(nn.Module):
    """BatchNorm over the feature axis, pooling every real token of the batch."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.register_buffer("running_mean", torch.zeros(hidden_size, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(hidden_size, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the running statistics to 8 mantissa bits, and
        # every later momentum update with them; they stay fp32 whatever dtype the model is cast to.
        super()._apply(fn, recurse)
        self.running_mean = self.running_mean.float()
        self.running_var = self.running_var.float()
        return self

    @property
    def frozen(self) -> bool:
        """Frozen affine parameters mean a frozen layer: running statistics are used and kept."""
        return not self.weight.requires_grad

    def batch_statistics(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None):
        """Mean and biased variance (fp32) over real tokens, global across processes, and the token count.

        ``count`` is the global number of real tokens (an fp32 scalar tensor, possibly 0); mean and variance
        are 0 when it is 0. A process whose shard is all padding contributes zeros and still takes part in
        the all-reduce, so every process sees the same statistics.
        """
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        if padding_mask is None:
            weights = x.new_ones(x.shape[0], 1)
        else:
            weights = padding_mask.reshape(-1, 1).to(device=x.device, dtype=torch.float32)
        x = x * weights
        totals = torch.cat([x.sum(0), (x * x).sum(0), weights.sum().reshape(1)])
        totals = _all_reduce_sum(totals)
        hidden = x.shape[-1]
        count = totals[-1]
        mean = totals[:hidden] / count.clamp(min=1.0)
        var = (totals[hidden : 2 * hidden] / count.clamp(min=1.0) - mean * mean).clamp(min=0.0)
        return mean, var, count

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and not self.frozen):
            # Running statistics: every token is normalised on its own, the mask is not needed.
            return self._normalise(hidden_states, self.running_mean, self.running_var)
        if padding_mask is not None:
            # Pad positions are zeroed before anything else: inf/nan there would otherwise reach real tokens'
            # gradients through the shared statistics (0 * inf in the backward of the variance).
            real = padding_mask.to(device=hidden_states.device, dtype=torch.bool).unsqueeze(-1)
            hidden_states = torch.where(real, hidden_states, torch.zeros_like(hidden_states))
        mean, var, count = self.batch_statistics(hidden_states, padding_mask)
        # Fewer than MIN_TOKENS real tokens in the whole (global) batch: no variance to estimate. The batch
        # is normalised with the running statistics, which do not move. Decided on tensors, without a
        # host sync, and identically on every process (``count`` is global).
        usable = count >= MIN_TOKENS
        if not _in_backward_replay():
            self._update_running(mean.detach(), var.detach(), count.detach(), usable)
        mean = torch.where(usable, mean, self.running_mean)
        var = torch.where(usable, var, self.running_var)
        return self._normalise(hidden_states, mean, var)

    def _normalise(self, hidden_states: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        out = (hidden_states.float() - mean.float()) * torch.rsqrt(var.float() + self.eps)
        out = out * self.weight.float() + self.bias.float()
        return out.to(hidden_states.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, usable: torch.Tensor) -> None:
        unbiased = var * count / (count - 1).clamp(min=1.0)
        rate = usable.to(self.running_mean.dtype) * self.momentum  # 0: the lerp leaves the buffers bit-identical
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), rate)
        self.num_batches_tracked += usable.to(self.num_batches_tracked.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"


def build(config, hidden_size: int) -> nn.Module:
    return SequenceBatchNorm(hidden_size, eps=config.batchnorm_eps, momentum=config.batchnorm_momentum)


def validate(config) -> None:
    if not 0.0 < config.batchnorm_momentum <= 1.0:
        raise ValueError(f"batchnorm_momentum must be in (0, 1], got {config.batchnorm_momentum}.")
    if config.batchnorm_eps <= 0:
        raise ValueError(f"batchnorm_eps must be > 0, got {config.batchnorm_eps}.")


COMPONENT = Component(
    kind="norm",
    name="batchnorm",
    factory=build,
    description="Padding-aware, process-synchronised BatchNorm over real tokens (fp32 statistics).",
    config_defaults={"batchnorm_momentum": 0.1, "batchnorm_eps": 1e-5},
    validate_config=validate,
)
