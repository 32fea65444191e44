"""The FlexAttention route of hfx_sliding_window and hfx_block_sparse: the compiled Flex forward equals the tiled
path, its BlockMask lists every tile that holds an allowed pair (and marks full only tiles that are), and the route
is chosen - and refused - as documented.

The compiled tests share one shape per backend, so Inductor compiles each backend's Flex kernel once: measured
20-60 s per backend on two busy CPU cores with a cold Inductor cache (about 45 s of CPU time for the file), about
15 s for the whole file with a warm one. They are marked slow (still part of CI)."""

import types

import pytest
import torch

from hfx_attention import flex_route
from hfx_attention.block_sparse import block_layout, block_sparse_attention
from hfx_attention.flex_route import block_sparse_tiles, choose_route, layout_blocks, sliding_window_tiles
from hfx_attention.sliding_window import sliding_window_attention

B, H, N, D = 3, 2, 300, 16  # 300: three Flex tiles of 128, the last one ragged
# fp32, unit-scale inputs, softmax over at most N keys: the two routes differ only in summation order (online vs
# two-pass softmax, other tile boundaries), a few ulp of eps = 1.2e-7 per output; 1e-5 leaves room for
# accumulation over N terms and would still catch any key missed or wrongly added (an O(1/N) = 3e-3 change).
ATOL = 1e-5

WHY_NOT = flex_route.flex_unusable(torch.device("cpu"))


def compiled(test):
    """A test that compiles Flex on CPU: slow, and skipped where no C++ compiler is present."""
    return pytest.mark.slow(pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))(test))


def module(causal, route, **config):
    return types.SimpleNamespace(
        config=types.SimpleNamespace(attention_route=route, **config), is_causal=causal, training=False, layer_idx=0
    )


def inputs(kv_heads=H, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=generator), torch.randn(B, kv_heads, N, D, generator=generator),
            torch.randn(B, kv_heads, N, D, generator=generator))


def padded_rows():
    """Row 0 full, row 1 right-padded, row 2 right-padded with a hole: three real lengths."""
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 250:] = 0
    mask[2, 40] = 0
    mask[2, 190:] = 0
    return mask


def assert_routes_agree(fn, causal, mask, kv_heads=H, **kwargs):
    q, k, v = inputs(kv_heads)
    with torch.no_grad():
        flex, _ = fn(module(causal, "flex", **CONFIG[fn]), q, k, v, mask, **kwargs)
        tiled, _ = fn(module(causal, "tiled", **CONFIG[fn]), q, k, v, mask, **kwargs)
    real = mask.bool()[:, :, None, None]  # outputs at padded query positions are meaningless
    torch.testing.assert_close(flex * real, tiled * real, atol=ATOL, rtol=0)


CONFIG = {sliding_window_attention: {"attention_window": 64}, block_sparse_attention: {"block_size": 32, "num_random_blocks": 2}}


@compiled
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_globals", [True, False])  # without: the CPU reference is the fused flash band path
def test_sliding_window_flex_equals_tiled_with_padding_and_globals(causal, with_globals):
    flags = torch.zeros(B, N, dtype=torch.long)
    flags[0, [3, 150]] = 1
    flags[1, 7] = 1
    kwargs = {"global_attention_mask": flags} if with_globals else {}
    assert_routes_agree(sliding_window_attention, causal, padded_rows(), **kwargs)


@compiled
def test_sliding_window_flex_equals_tiled_on_packed_sequences():
    positions = torch.cat([torch.arange(100), torch.arange(120), torch.arange(80)])[None].expand(B, -1)
    flags = torch.zeros(B, N, dtype=torch.long)
    flags[:, 130] = 1  # global inside the second packed sequence: seen by that sequence only
    assert_routes_agree(sliding_window_attention, True, torch.ones(B, N, dtype=torch.long), position_ids=positions,
                        global_attention_mask=flags)


@compiled
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_flex_equals_tiled_per_row_layouts_and_grouped_heads(causal):
    extra = torch.zeros(B, N, dtype=torch.long)
    extra[0, 100] = 1
    extra[2, 120] = 1
    # one key/value head for both query heads: Flex shares it (enable_gqa) instead of repeating it
    assert_routes_agree(block_sparse_attention, causal, padded_rows(), kv_heads=1, global_attention_mask=extra)


def dense_sliding(keep, flags, segments, length, half, causal):
    """Token-level reference of hfx_sliding_window's pattern: bool (B, length, K)."""
    kv_length = keep.shape[1]
    i = torch.arange(kv_length - length, kv_length)[:, None]
    j = torch.arange(kv_length)[None]
    allowed = ((i - j).abs() <= half)[None] | flags[:, i.squeeze(1)][:, :, None] | flags[:, None, :]
    if causal:
        allowed = allowed & (j <= i)[None]
    allowed = allowed & (segments[:, i.squeeze(1)][:, :, None] == segments[:, None, :])
    return allowed & keep[:, None, :]


def tile_truth(dense):
    """(…, q, k) token mask -> per FLEX_BLOCK tile: any pair allowed, every pair allowed."""
    size = flex_route.FLEX_BLOCK
    q, k = dense.shape[-2:]
    padded = torch.nn.functional.pad(dense.float(), (0, -k % size, 0, -q % size), value=float("nan"))
    t = padded.unflatten(-1, (-1, size)).unflatten(-3, (-1, size)).transpose(-3, -2)  # (…, qt, kt, size, size)
    real = ~t.isnan()
    return (t.nan_to_num(0) > 0).flatten(-2).any(-1), ((t == 1) | ~real).flatten(-2).all(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [600, 100])  # 100 of 600: the last queries of a longer key cache
def test_sliding_window_tiles_cover_every_allowed_pair(causal, length):
    kv_length, half = 600, 300  # 300 > 255: a tile and its neighbours are wholly inside the band
    keep = torch.ones(2, kv_length, dtype=torch.bool)
    keep[1, 450:] = False
    keep[0, 300:320] = False
    flags = torch.zeros(2, kv_length, dtype=torch.bool)
    flags[0, 10] = flags[1, 520] = True
    segments = torch.zeros(2, kv_length, dtype=torch.long)
    if length == kv_length:
        segments[0, 200:] = 1
    blocks, full = sliding_window_tiles(keep, flags, segments, length, half, causal)
    any_pair, all_pairs = tile_truth(dense_sliding(keep, flags, segments, length, half, causal))
    assert not (any_pair & ~blocks).any(), "a tile with an allowed pair is missing from the BlockMask"
    assert not (full & ~all_pairs).any(), "a tile marked full holds a disallowed pair"
    assert not (full & ~blocks).any()
    # the band's interior skips mask_mod; ragged tiles (100 queries, the 88 last keys) are always partial
    assert full.any() == (length == kv_length)


def test_sliding_window_tiles_stay_a_band():
    n, half = 4096, 256
    keep = torch.ones(1, n, dtype=torch.bool)
    blocks, full = sliding_window_tiles(keep, None, None, n, half, False)
    # a 128-row tile meets keys within 256 + 127 on each side: 5 tiles (2 partial + 3 full), never 32
    assert blocks.sum(-1).max() == 5 and full.sum(-1).max() == 3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", [48, 128])  # 48 does not divide 128: fine blocks straddle Flex tiles
def test_block_sparse_tiles_cover_every_allowed_pair(causal, size):
    n, heads = 700, 2
    num_blocks = -(-n // size)
    index, valid = block_layout(num_blocks, heads, 2, 0, 0, causal)
    blocks = layout_blocks(index, valid, num_blocks)[None].expand(2, -1, -1, -1)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, 500:] = False
    flags = torch.arange(n)[None].expand(2, -1) < size
    token_pairs = blocks.repeat_interleave(size, -1).repeat_interleave(size, -2)[..., :n, :n]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    dense = (token_pairs | flags[:, None, :, None] | flags[:, None, None, :]) & keep[:, None, None, :]
    if causal:
        dense = dense & (j <= i)
    coarse, full = block_sparse_tiles(keep, flags, blocks, size, causal)
    any_pair, all_pairs = tile_truth(dense)
    assert not (any_pair & ~coarse).any()
    assert not (full & ~all_pairs).any()
    assert full.any() == (size == 128)  # with 128-blocks the band blocks are whole Flex tiles


def test_layout_blocks_matches_the_layout_slots():
    index, valid = block_layout(9, 2, 2, 0, 3, False)
    dense = layout_blocks(index, valid, 9)
    for h in range(2):
        for qb in range(9):
            want = {int(i) for i, ok in zip(index[h, qb], valid[h, qb]) if ok}
            assert set(dense[h, qb].nonzero().flatten().tolist()) == want


def fake_query(length, device="cuda", requires_grad=False):
    """Shape and device only: enough for the route decision, which must not touch data."""
    return types.SimpleNamespace(shape=(1, H, length, D), device=torch.device(device), is_cuda=device == "cuda",
                                 requires_grad=requires_grad)


def test_auto_route_on_cpu_is_tiled():
    q, k, v = inputs()
    config = types.SimpleNamespace(attention_route="auto")
    with torch.no_grad():
        assert choose_route(config, q, k, v, 0.0, "hfx_sliding_window") == "tiled"
    assert choose_route(None, q, k, v, 0.0, "hfx_sliding_window") == "tiled"


def test_auto_route_on_cuda_takes_flex_for_full_forwards_only(monkeypatch):
    monkeypatch.setattr(flex_route, "flex_unusable", lambda device: None)
    config = types.SimpleNamespace(attention_route="auto")
    full = fake_query(512)
    assert choose_route(config, full, full, full, 0.0, "x") == "flex"
    assert choose_route(config, fake_query(1), full, full, 0.0, "x") == "tiled"  # cached decoding
    assert choose_route(config, full, full, full, 0.1, "x") == "tiled"  # Flex has no attention dropout
    assert choose_route(types.SimpleNamespace(attention_route="tiled"), full, full, full, 0.0, "x") == "tiled"
    monkeypatch.setattr(flex_route, "flex_unusable", lambda device: "no Triton")
    assert choose_route(config, full, full, full, 0.0, "x") == "tiled"
    with pytest.raises(ValueError, match="attention_route='flex' cannot run: no Triton"):
        choose_route(types.SimpleNamespace(attention_route="flex"), full, full, full, 0.0, "x")


@pytest.mark.parametrize("fn", [sliding_window_attention, block_sparse_attention])
def test_flex_route_refuses_training_on_cpu(fn):
    q, k, v = (t.requires_grad_() for t in inputs())
    with pytest.raises(ValueError, match=r"attention_route='flex' on CPU runs forward only.*'auto' or 'tiled'"):
        fn(module(False, "flex", **CONFIG[fn]), q, k, v, None)


@pytest.mark.parametrize("fn", [sliding_window_attention, block_sparse_attention])
def test_bad_route_is_refused_with_the_valid_ones(fn):
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"attention_route must be one of 'auto', 'tiled', 'flex'; got 'triton'"):
        fn(module(False, "triton", **CONFIG[fn]), q, k, v, None)


def test_flex_route_refuses_dropout():
    q, k, v = inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout, got dropout=0.1"):
        sliding_window_attention(module(False, "flex", **CONFIG[sliding_window_attention]), q, k, v, None, dropout=0.1)


def test_flex_unusable_names_the_reason():
    assert "not on 'meta'" in flex_route.flex_unusable(torch.device("meta"))


@pytest.fixture
def fresh_api_check():
    flex_route.flex_api_missing.cache_clear()
    yield
    flex_route.flex_api_missing.cache_clear()


@pytest.mark.usefixtures("fresh_api_check")
@pytest.mark.parametrize("missing", ["seq_lengths", "enable_gqa"])
def test_an_older_flex_api_is_a_reason_auto_goes_tiled_and_flex_refuses(monkeypatch, missing):
    """A torch with the Flex module but without a keyword argument the route passes: found before any forward."""
    import torch.nn.attention.flex_attention as api

    assert flex_route.flex_api_missing() is None  # the installed torch has both
    flex_route.flex_api_missing.cache_clear()
    if missing == "seq_lengths":
        def old(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, BLOCK_SIZE=128, mask_mod=None):
            raise AssertionError("never called")

        monkeypatch.setattr(api.BlockMask, "from_kv_blocks", classmethod(old))
    else:
        def old(query, key, value, score_mod=None, block_mask=None, scale=None, return_lse=False, kernel_options=None):
            raise AssertionError("never called")

        monkeypatch.setattr(api, "flex_attention", old)
    reason = flex_route.flex_unusable(torch.device("cuda"))
    assert f"takes no {missing}=" in reason
    config = types.SimpleNamespace(attention_route="auto")
    full = fake_query(512, "cuda")
    assert choose_route(config, full, full, full, 0.0, "x") == "tiled"
    with pytest.raises(ValueError, match=f"attention_route='flex' cannot run: .*takes no {missing}="):
        choose_route(types.SimpleNamespace(attention_route="flex"), full, full, full, 0.0, "x")


@pytest.mark.parametrize("attention_type", ["hfx_sliding_window", "hfx_block_sparse"])
def test_model_config_takes_and_checks_the_route(attention_type):
    from hfx.configuration_hfx import HfxConfig

    assert HfxConfig(attention_type=attention_type).attention_route == "auto"
    assert HfxConfig(attention_type=attention_type, attention_route="tiled").attention_route == "tiled"
    with pytest.raises(ValueError, match=rf"{attention_type}: attention_route must be one of .*got 'gpu'"):
        HfxConfig(attention_type=attention_type, attention_route="gpu")
