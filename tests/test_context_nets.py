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


def test_check_context_lines_and_dtype():
    from difflab.nets.context import check_context

    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(UserError, match=r"needs a context \(e\.g\. DDDM's estimate\); pass context=\.\.\.$"):
        check_context(None, x, 3)
    for bad in (torch.randn(3, 3, 4, 4), torch.randn(2, 3, 16), torch.randn(2, 1, 4, 4)):  # batch, ndim, channels
        with pytest.raises(UserError, match=r"context must have shape \[2, 3, H, W\], got \[" +
                           ", ".join(map(str, bad.shape)) + r"\]$"):
            check_context(bad, x, 3)
    out = check_context(torch.randn(2, 3, 1, 1, dtype=torch.float64), x, 3)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 1)


class _Recorder(torch.nn.Module):
    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.got = (x, noise_labels, class_labels, augment_labels)
        return x[:, :1]


def test_concat_context_passes_labels_and_names_a_wrong_size():
    net = ConcatContext(_Recorder(), context_channels=2)
    x, c = torch.randn(2, 1, 4, 4), torch.randn(2, 2, 4, 4)
    t, labels, aug = torch.tensor([1.0, 2.0]), torch.eye(3)[:2], torch.randn(2, 9)
    net(x, t, labels, aug, context=c)
    cat, got_t, got_labels, got_aug = net.net.got
    assert torch.equal(cat, torch.cat([x, c], 1)) and torch.equal(got_t, t)
    assert got_labels is labels and got_aug is aug
    with pytest.raises(UserError, match=r"^context_mode concat needs the context at the image size \[4, 4\], "
                                        r"got \[4, 2\]$"):
        net(x, t, context=torch.randn(2, 2, 4, 2))


def _attention_by_hand(attn, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out: bias-free q/k/v, softmax(q k^T / sqrt(d_head)) v per head, W_o + b_o."""
    n, length, d = q_in.shape
    h = attn.num_heads
    q, k, v = (t @ m.weight.T for t, m in ((q_in, attn.to_q), (kv_in, attn.to_k), (kv_in, attn.to_v)))
    split = lambda t: t.reshape(n, t.shape[1], h, d // h).permute(0, 2, 1, 3)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    out = (w @ split(v)).permute(0, 2, 1, 3).reshape(n, length, d)
    return out @ attn.to_out.weight.T + attn.to_out.bias


def test_spatial_transformer_forward_by_hand():
    """Every part of the block against a hand-written forward with random (non-zero) weights: GroupNorm with
    eps 1e-6 (input variance ~1e-6, so eps matters), the three residual paths added, the gated-GELU MLP, the
    token layout back to pixels, and a block output ``x + proj_out(h)``."""
    torch.manual_seed(0)
    channels, inner, heads = 33, 24, 3
    block = randomize_(SpatialTransformer(channels, 2, num_heads=heads, inner_dim=inner))
    assert block.norm.num_groups == 11  # the largest divisor of 33 not above 32
    assert SpatialTransformer(45, 2, num_heads=1, inner_dim=8).norm.num_groups == 15
    x = 1e-3 * torch.randn(2, channels, 3, 5) + torch.randn(2, 1, 1, 1)  # group variance ~1e-6
    ctx = torch.randn(2, 2, 4, 2)
    n, _, H, W = x.shape
    g = block.norm
    h = torch.nn.functional.group_norm(x, 11, g.weight, g.bias, eps=1e-6)
    h = torch.nn.functional.conv2d(h, block.proj_in.weight, block.proj_in.bias).flatten(2).transpose(1, 2)
    tokens = torch.nn.functional.conv2d(ctx, block.proj_context.weight, block.proj_context.bias)
    tokens = tokens.flatten(2).transpose(1, 2)
    ln = lambda m, t: torch.nn.functional.layer_norm(t, (inner,), m.weight, m.bias, 1e-5)  # noqa: E731
    y = ln(block.norm1, h)
    h = h + _attention_by_hand(block.attn1, y, y)
    h = h + _attention_by_hand(block.attn2, ln(block.norm2, h), tokens)
    z = ln(block.norm3, h) @ block.ff_in.weight.T + block.ff_in.bias
    a, gate = z[..., :4 * inner], z[..., 4 * inner:]
    h = h + (a * torch.nn.functional.gelu(gate)) @ block.ff_out.weight.T + block.ff_out.bias
    pixels = h.transpose(1, 2).reshape(n, inner, H, W)
    want = x + torch.nn.functional.conv2d(pixels, block.proj_out.weight, block.proj_out.bias)
    torch.testing.assert_close(block(x, ctx), want, atol=1e-5, rtol=1e-4)
    assert not any(name.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for name, _ in block.named_parameters())
    with pytest.raises(UserError, match="inner dim 10 does not split into 3 heads"):
        SpatialTransformer(8, 2, num_heads=3, inner_dim=10)
