"""Mixture-of-Experts feed-forward (DeepSeekMoE style): a softmax router sends each token to its top-k of
many small routed experts, beside shared experts that every token always goes through.

The routed experts are stored in transformers' stacked layout and dispatched through its
``ExpertsInterface`` (``@use_experts_implementation``), so ``experts_implementation="eager" |
"batched_mm" | "grouped_mm"`` chooses the kernel with no hfx code involved. The router's load-balancing
(Switch Transformer) and z (ST-MoE) losses reach the model's loss through :mod:`hfx.auxiliary`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from hfx.auxiliary import Auxiliary, report
from hfx.registry import Component
from hfx_ffn.dense import DenseFeedForward

EXPERT_TYPES = ("mlp", "swiglu")

MOE_DEFAULTS = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 0,
    "moe_intermediate_size": None,  # None: intermediate_size
    "moe_expert_type": "mlp",
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.0,
    "first_k_dense_replace": 0,
    "output_router_logits": False,
}


def expert_width(config) -> int:
    """Hidden width of one routed (and one shared) expert: fine-grained experts are narrower than the dense FFN."""
    return config.moe_intermediate_size if config.moe_intermediate_size is not None else config.intermediate_size


def num_moe_layers(config) -> int:
    """MoE blocks in the model: both stacks of an encoder–decoder (``first_k_dense_replace`` applies to each)."""
    stacks = [config.num_hidden_layers]
    if getattr(config, "is_encoder_decoder", False):
        stacks.append(config.decoder_layers or config.num_hidden_layers)
    return sum(max(0, layers - config.first_k_dense_replace) for layers in stacks)


@use_experts_implementation(has_gate=False, has_bias=True)
class MlpExperts(nn.Module):
    """``num_experts`` two-layer MLPs (Linear, activation, Linear, with biases) stacked on a leading expert axis:
    ``up_proj [E, I, H]``, ``up_proj_bias [E, I]``, ``down_proj [E, H, I]``, ``down_proj_bias [E, H]``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        width, hidden = expert_width(config), config.hidden_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, width, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(self.num_experts, width))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert(self, index: int, states: torch.Tensor) -> torch.Tensor:
        up = F.linear(states, self.up_proj[index], self.up_proj_bias[index])
        return F.linear(self.act_fn(up), self.down_proj[index], self.down_proj_bias[index])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _eager_experts(self, hidden_states, top_k_index, top_k_weights)

    def hfx_init_weights(self, config):
        for weight in (self.up_proj, self.down_proj):
            init.normal_(weight, mean=0.0, std=config.initializer_range)
        for bias in (self.up_proj_bias, self.down_proj_bias):
            init.zeros_(bias)


@use_experts_implementation(has_gate=True, has_bias=False)
class SwiGLUExperts(nn.Module):
    """``num_experts`` gated experts, ``down(silu(gate x) * up x)`` without biases, as in Mixtral / DeepSeek:
    ``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows), ``down_proj [E, H, I]``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        width, hidden = expert_width(config), config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))
        self.act_fn = ACT2FN["silu"]

    def expert(self, index: int, states: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(states, self.gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[index])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _eager_experts(self, hidden_states, top_k_index, top_k_weights)

    def hfx_init_weights(self, config):
        for weight in (self.gate_up_proj, self.down_proj):
            init.normal_(weight, mean=0.0, std=config.initializer_range)


def _eager_experts(experts, hidden_states, top_k_index, top_k_weights):
    """The ``eager`` implementation: each expert that received tokens runs once on exactly those tokens."""
    out = torch.zeros_like(hidden_states)
    for index in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == index)
        contribution = experts.expert(index, hidden_states[token]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, contribution.to(out.dtype))
    return out


class GatedFeedForward(nn.Module):
    """The shared experts of a ``swiglu`` MoE: one gated FFN as wide as all shared experts together."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class TopKRouter(nn.Module):
    """Token -> expert logits. Not an ``nn.Linear`` on purpose: bitsandbytes then never quantises it, so
    routing decisions keep full precision in a 4-bit model (the router is E x H, a negligible share)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states):
        return F.linear(hidden_states, self.weight)

    def hfx_init_weights(self, config):
        init.normal_(self.weight, mean=0.0, std=config.initializer_range)


class MoEFeedForward(nn.Module):
    """Routed top-k experts plus always-on shared experts, in place of the dense feed-forward network.

    Routing: ``p = softmax(router(x))`` over all experts, the top-k kept with weights ``p`` (renormalised to sum
    to 1 when ``norm_topk_prob``). The output is ``sum_k w_k expert_k(x) + shared(x)``.

    Auxiliary losses, per layer, computed over real tokens only (``padding_mask``) and divided by the number of
    MoE layers, so their sum over the model is the *mean* over MoE layers:
    ``router_aux_loss_coef * E * sum_e f_e P_e`` (Switch: ``f_e`` share of the token-to-expert assignments that
    went to ``e``, ``P_e`` mean router probability of ``e``; 1.0 when perfectly balanced) and
    ``router_z_loss_coef * mean(logsumexp(logits)^2)``. They are added to the loss in training mode only, so an
    evaluation loss stays comparable with a dense model's; the unweighted values are always reported as stats.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_coef = float(config.router_aux_loss_coef)
        self.z_coef = float(config.router_z_loss_coef)
        self.output_router_logits = config.output_router_logits
        self.layer_share = 1.0 / num_moe_layers(config)
        self.router = TopKRouter(config.hidden_size, config.num_experts)
        experts_class = SwiGLUExperts if config.moe_expert_type == "swiglu" else MlpExperts
        self.experts = experts_class(config)
        self.shared_experts = None
        if config.num_shared_experts:
            shared_width = config.num_shared_experts * expert_width(config)
            if config.moe_expert_type == "swiglu":
                self.shared_experts = GatedFeedForward(config.hidden_size, shared_width)
            else:
                self.shared_experts = DenseFeedForward(config.hidden_size, shared_width, config.hidden_act)
        self._last: Auxiliary | None = None

    def route(self, flat: torch.Tensor):
        """Router logits, probabilities (fp32), top-k expert ids and their weights for (tokens, hidden) input."""
        logits = self.router(flat)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, index, weights

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits, probs, index, weights = self.route(flat)
        out = self.experts(flat, index, weights.to(flat.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        real = None if padding_mask is None else padding_mask.reshape(-1).to(flat.device, torch.bool)
        self._last = self._auxiliary(logits, probs, index, real)
        report(self)
        return out.reshape(shape)

    def _auxiliary(self, logits, probs, index, real) -> Auxiliary:
        # Real tokens weigh 1 and padding 0: no boolean indexing, so no host sync on the forward path.
        weight = probs.new_ones(probs.shape[0]) if real is None else real.to(probs.dtype)
        tokens = weight.sum().clamp_min(1.0)
        counts = torch.bincount(index.flatten(), weights=weight.repeat_interleave(self.top_k), minlength=self.num_experts)
        share = counts / counts.sum().clamp_min(1.0)
        balance = self.num_experts * (share * (probs * weight[:, None]).sum(dim=0) / tokens).sum()
        z_loss = (torch.logsumexp(logits.float(), dim=-1).square() * weight).sum() / tokens
        loss = None
        if self.training and (self.aux_coef or self.z_coef):
            loss = self.layer_share * (self.aux_coef * balance + self.z_coef * z_loss)
        stats = {"expert_counts": counts.detach(), "balance_loss": balance.detach(), "router_z_loss": z_loss.detach()}
        router_logits = None
        if self.output_router_logits:
            router_logits = logits if real is None else logits[real]
        return Auxiliary(loss=loss, stats=stats, router_logits=router_logits)

    def hfx_auxiliary(self) -> Auxiliary | None:
        return self._last


def _expert_load_callback_class():
    """Defined on first use: importing transformers' trainer machinery costs seconds a plain model load should not pay."""
    from transformers import TrainerCallback

    class ExpertLoadCallback(TrainerCallback):
        """Adds the routers' health to Trainer's logs, over every micro-batch of each logging interval.

        Keys: ``moe_aux_loss`` (mean weighted auxiliary loss added to the loss), ``moe_balance_loss`` (mean
        unweighted Switch value over MoE layers; 1.0 is balanced), ``moe_max_load`` (largest share of one
        expert times ``num_experts`` over the interval, in any layer; 1.0 is balanced). ``history`` keeps, per
        log, the per-layer token counts (``expert_counts``: MoE layers x experts). Add it first
        (``trainer.callback_handler.callbacks.insert(0, ExpertLoadCallback())``) for other loggers to see the keys.
        """

        def __init__(self):
            self.history: list[dict] = []
            self._reset()

        def _reset(self):
            self._counts, self._aux, self._balance, self._micro_batches = None, 0.0, 0.0, 0

        def _gather(self, model):
            parts = [m._last for m in model.modules() if isinstance(m, MoEFeedForward) and m._last is not None]
            if not parts:
                return
            counts = torch.stack([part.stats["expert_counts"].float().cpu() for part in parts])
            self._counts = counts if self._counts is None else self._counts + counts
            self._aux += sum(float(part.loss.detach()) for part in parts if part.loss is not None)
            self._balance += float(torch.stack([part.stats["balance_loss"].float().cpu() for part in parts]).mean())
            self._micro_batches += 1

        def on_substep_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self._gather(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self._gather(model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self._micro_batches or logs is None:
                return
            share = self._counts / self._counts.sum(dim=-1, keepdim=True).clamp_min(1)
            entry = {
                "moe_aux_loss": self._aux / self._micro_batches,
                "moe_balance_loss": self._balance / self._micro_batches,
                "moe_max_load": float((share * share.shape[-1]).max()),
            }
            logs.update(entry)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(entry)
            self.history.append({"step": state.global_step, **entry, "expert_counts": self._counts.tolist()})
            self._reset()

    return ExpertLoadCallback


_LAZY = {}


def __getattr__(name):
    if name == "ExpertLoadCallback":
        if name not in _LAZY:
            _LAZY[name] = _expert_load_callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(config, layer_idx: int = 0) -> nn.Module:
    """The MoE block of layer ``layer_idx``; the first ``first_k_dense_replace`` layers keep the dense FFN."""
    if layer_idx < config.first_k_dense_replace:
        return DenseFeedForward(config.hidden_size, config.intermediate_size, config.hidden_act)
    return MoEFeedForward(config)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; valid values: {valid}.")


def validate(config) -> None:
    num_experts = config.num_experts
    _check("num_experts", num_experts, _is_int(num_experts) and num_experts >= 1, "an integer >= 1")
    k = config.num_experts_per_tok
    _check("num_experts_per_tok", k, _is_int(k) and 1 <= k <= num_experts,
           f"an integer in [1, num_experts={num_experts}]")
    shared = config.num_shared_experts
    _check("num_shared_experts", shared, _is_int(shared) and shared >= 0, "an integer >= 0")
    width = config.moe_intermediate_size
    _check("moe_intermediate_size", width, width is None or (_is_int(width) and width > 0),
           "None (intermediate_size) or an integer > 0")
    _check("moe_expert_type", config.moe_expert_type, config.moe_expert_type in EXPERT_TYPES, str(list(EXPERT_TYPES)))
    for name in ("norm_topk_prob", "output_router_logits"):
        _check(name, getattr(config, name), isinstance(getattr(config, name), bool), "True or False")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        _check(name, value, ok, "a finite number >= 0")
    dense = config.first_k_dense_replace
    layers = config.num_hidden_layers
    _check("first_k_dense_replace", dense, _is_int(dense) and 0 <= dense < layers,
           f"an integer in [0, num_hidden_layers={layers}) (at least one layer must be MoE)")
    if config.hidden_act not in ACT2FN:
        raise ValueError(f"hidden_act={config.hidden_act!r} is unknown; valid: {sorted(ACT2FN)}.")


COMPONENT = Component(
    kind="ffn",
    name="moe",
    factory=build,
    description="Mixture of Experts: softmax top-k routed experts plus shared experts (DeepSeekMoE), "
    "dispatched through transformers' experts_implementation.",
    config_defaults=MOE_DEFAULTS,
    validate_config=validate,
)
