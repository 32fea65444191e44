"""hfx convert-long: a short BERT/RoBERTa checkpoint becomes a long one with unchanged short-input outputs."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaModel

from hfx.cli import main
from hfx.long_context import load_long_model


@pytest.mark.parametrize(
    "model_class,config",
    [
        (BertForMaskedLM, BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)),
        (RobertaModel, RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=18, pad_token_id=1)),
    ],
)
def test_convert_long_keeps_short_outputs(model_class, config, tmp_path):
    short = model_class(config).eval()
    short.save_pretrained(tmp_path / "short")
    assert main(["convert-long", str(tmp_path / "short"), str(tmp_path / "long"), "--max-position-embeddings", "100",
                 "--attention-window", "16", "--global-token-id", "2"]) == 0
    long = load_long_model(tmp_path / "long").eval()
    assert long.config.max_position_embeddings == 100 and long.config._attn_implementation == "hfx_sliding_window"
    input_ids = torch.randint(3, 50, (2, 9))
    input_ids[:, 0] = 2
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.no_grad():
        want = short(input_ids, attention_mask=mask)[0]
        got = long(input_ids, attention_mask=mask)[0]
        long_out = long(torch.randint(3, 50, (1, 90)))[0]
    real = mask.bool()[:, :, None]
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)
    assert torch.isfinite(long_out).all()
    table = long.base_model.embeddings.position_embeddings.weight
    offset = 2 if config.model_type == "roberta" else 0
    learned = config.max_position_embeddings - offset
    torch.testing.assert_close(table[offset + learned : offset + 2 * learned], table[offset : offset + learned])


def test_convert_long_rejects_odd_window(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match="attention_window must be an even integer >= 2.*got 15"):
        main(["convert-long", str(tmp_path / "short"), str(tmp_path / "long"), "--attention-window", "15"])
