"""Conditioning backbones on an image-shaped context (specs/gaussian_and_dddm.md §6.3, DDDM's estimate):
cross-attention SpatialTransformer blocks in the ADM and DDPM U-Nets, channel concatenation for any backbone."""

from __future__ import annotations

import pytest
import torch

from difflab.errors import UserError
from difflab.nets import build_network
from difflab.nets.context import ConcatContext, SpatialTransformer
from difflab.nets.layers import ContextBlock
from tests.test_nets import inputs, one_thread, randomize_  # noqa: F401  (fixture)

UNETS = {"adm": dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[4], dropout=0.0),
         "ddpm_unet": dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                           num_res_blocks=1, attn_resolutions=[4], dropout=0.0, num_groups=8)}


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(name, **{**UNETS.get(name, {}), **kw})


@pytest.mark.parametrize("name", list(UNETS))
def test_cross_attention_context_changes_the_output(name):
    net = randomize_(build(name, context_channels=3)).eval()
    blocks = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    # encoder + decoder blocks at 4x4 and the middle block (ADM: 1 + 2 + 1; DDPM: 1 + 2 + 1)
    assert len(blocks) == 4 and not any(m.__class__.__name__ == "AttnBlock" for m in net.modules())
    x, t = inputs()
    c1, c2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    y1, y2 = net(x, t, context=c1), net(x, t, context=c2)
    assert (y1 - y2).abs().max() > 1e-3
    torch.testing.assert_close(net(x, t, context=c1), y1)  # deterministic in eval
    with pytest.raises(UserError, match="needs a context"):
        net(x, t)


@pytest.mark.parametrize("name", list(UNETS))
def test_without_context_channels_the_context_is_ignored(name):
    net = randomize_(build(name)).eval()
    assert not any(isinstance(m, SpatialTransformer) for m in net.modules())
    x, t = inputs()
    torch.testing.assert_close(net(x, t, context=torch.randn(4, 3, 8, 8)), net(x, t))


def test_adm_cross_attention_replaces_the_self_attention_of_its_blocks():
    net = build("adm", context_channels=3)
    wrapped = [m for m in net.modules() if isinstance(m, ContextBlock)]
    assert len(wrapped) == 4 and all(m.block.num_heads == 0 for m in wrapped)


def test_spatial_transformer_is_the_identity_at_init():
    torch.manual_seed(0)
    block = SpatialTransformer(16, 3, num_heads=4, inner_dim=32)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 3, 8, 8)), x)


def test_cross_attention_to_identical_tokens_returns_their_value():
    """softmax over equal keys is uniform, so attention to a constant context is ``W_o W_v c`` for every query:
    the block output then equals the same block with its self-attention and MLP paths, fed a one-pixel context."""
    torch.manual_seed(0)
    block = randomize_(SpatialTransformer(16, 3, num_heads=2, inner_dim=32))
    x = torch.randn(2, 16, 4, 4)
    c = torch.randn(2, 3, 1, 1)
    # one token per context pixel: a constant 6x6 context gives 36 equal tokens = one token
    torch.testing.assert_close(block(x, c.expand(2, 3, 6, 6)), block(x, c), atol=1e-5, rtol=1e-5)
    tokens = block.proj_context(c).flatten(2).transpose(1, 2)
    value = block.attn2.to_out(block.attn2.to_v(tokens))  # [2, 1, 32]
    q = torch.randn(2, 16, 32)
    torch.testing.assert_close(block.attn2(q, tokens), value.expand(2, 16, 32))


@pytest.mark.parametrize("name,kw", [("ddpmpp", dict(img_resolution=8, in_channels=3, out_channels=3,
                                                      model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                                      attn_resolutions=[])),
                                     ("unetmini", dict(img_resolution=8, in_channels=3, out_channels=3,
                                                       model_channels=16, channel_mult=[1, 2], num_res_blocks=1)),
                                     ("dit", dict(img_resolution=8, in_channels=3, out_channels=3, hidden_size=32,
                                                  depth=1, num_heads=2)),
                                     ("adm", UNETS["adm"])])
def test_concat_context_works_for_any_backbone(name, kw):
    net = randomize_(build(name, **kw, context_channels=3, context_mode="concat")).eval()
    assert isinstance(net, ConcatContext) and net.net.in_channels == 6
    x, t = inputs()
    c1, c2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert (net(x, t, context=c1) - net(x, t, context=c2)).abs().max() > 1e-3
    torch.testing.assert_close(net(x, t, context=c1), net.net(torch.cat([x, c1], 1), t))
    with pytest.raises(UserError, match="needs a context"):
        net(x, t)


def test_context_options_are_checked():
    kw = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4])
    with pytest.raises(UserError, match="context_mode=concat"):
        build("ddpmpp", **kw, context_channels=3)
    with pytest.raises(UserError, match="context_mode 'film'"):
        build("ddpmpp", **kw, context_channels=3, context_mode="film")
    net = build("adm", context_channels=3)
    x, t = inputs()
    with pytest.raises(UserError, match=r"context must have shape \[4, 3, H, W\]"):
        net(x, t, context=torch.randn(4, 1, 8, 8))
