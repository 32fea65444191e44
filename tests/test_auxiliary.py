"""The auxiliary-loss contract: what reported in this forward, summed into every head's loss."""

import torch
from torch import nn

from hfx import auxiliary
from hfx.auxiliary import Auxiliary
from hfx.registry import Component, registry
from tests.conftest import tiny_config


class _Penalised(nn.Module):
    """A dense FFN whose penalty is its output's mean square; it reports only when ``active``."""

    active = True

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(config.hidden_size, config.hidden_size)
        self.last = None

    def forward(self, hidden_states):
        out = self.linear(hidden_states)
        self.last = Auxiliary(loss=out.pow(2).mean(), stats={"mean": out.detach().mean().reshape(1)})
        if self.active:
            auxiliary.report(self)
        return out

    def hfx_auxiliary(self):
        return self.last


def _model():
    from hfx import HfxForCausalLM

    registry.register(Component(kind="ffn", name="test_penalised", factory=_Penalised))
    try:
        torch.manual_seed(0)
        return HfxForCausalLM(tiny_config(ffn_type="test_penalised", is_decoder=True)).eval()
    finally:
        registry.unregister("ffn", "test_penalised")


def test_loss_is_the_head_loss_plus_every_reported_penalty():
    model = _model()
    ids = torch.randint(1, model.config.vocab_size, (2, 6))
    out = model(input_ids=ids, labels=ids)
    ffns = [layer.ffn for layer in model.model.layers]
    expected_aux = sum(f.last.loss for f in ffns)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    logits_loss = model.loss_function(logits=out.logits, labels=ids, vocab_size=model.config.vocab_size)
    torch.testing.assert_close(out.loss, logits_loss + expected_aux)
    assert out.aux_stats["mean"].shape == (len(ffns), 1)


def test_a_module_that_did_not_report_in_this_forward_does_not_count():
    model = _model()
    ids = torch.randint(1, model.config.vocab_size, (1, 5))
    model(input_ids=ids)  # every layer has state from this forward
    first = model.model.layers[0].ffn
    first.active = False  # this instance keeps its state but stops reporting
    out = model(input_ids=ids)
    torch.testing.assert_close(out.aux_loss, sum(layer.ffn.last.loss for layer in model.model.layers[1:]))


def test_report_outside_a_model_forward_is_a_no_op_and_inside_counts_once():
    module = _Penalised(tiny_config())
    module(torch.randn(1, 2, module.linear.in_features))  # no enclosing collecting(): nothing to report to
    with auxiliary.collecting() as reported:
        module(torch.randn(1, 2, module.linear.in_features))
        auxiliary.report(module)
    assert reported == [module]
    assert auxiliary.collect([]).loss is None
