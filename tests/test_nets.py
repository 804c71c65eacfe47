"""Backbones: SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM), shared layers and the registry
(specs/gaussian_and_dddm.md §5.5, §4.4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import UserError
from difflab.nets import NETWORKS, build_network, network_kwargs_defaults, register_network
from difflab.nets.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    PositionalEmbedding,
    UNetBlock,
    downsample2d,
    resample_kernel,
    self_attention,
    upsample2d,
    weight_init,
)

TINY = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
SONG_VARIANTS = [(e, d) for e in ("standard", "skip", "residual") for d in ("standard", "skip")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run ~10x faster on one thread than with two threads contending (shared CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(name, **{**TINY, **kwargs})


def randomize_(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Replace every parameter with O(1)-scale noise, so zero-initialised branches carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def inputs(n: int = 4, c: int = 3, res: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, res, res, generator=g), torch.rand(n, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# Shapes and the call signature


@pytest.mark.parametrize("encoder_type,decoder_type", SONG_VARIANTS)
def test_songunet_variants_keep_shape_and_out_channels(encoder_type, decoder_type):
    for name in ("ddpmpp", "ncsnpp"):
        net = tiny(name, encoder_type=encoder_type, decoder_type=decoder_type, out_channels=6).eval()
        x, t = inputs()
        assert net(x, t).shape == (4, 6, 8, 8)


def test_adm_shape_three_levels_and_learned_variance_channels():
    net = tiny("adm", img_resolution=16, channel_mult=[1, 2, 2], attn_resolutions=[8, 4], out_channels=6)
    x, t = inputs(res=16)
    assert net(x, t).shape == (4, 6, 16, 16)


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_scalar_noise_label_broadcasts(name):
    net = randomize_(tiny(name)).eval()
    x, _ = inputs()
    torch.testing.assert_close(net(x, 0.3), net(x, torch.full([4], 0.3)))


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_each_image_is_processed_independently_of_the_batch(name):
    net = randomize_(tiny(name, label_dim=3)).eval()
    x, t = inputs()
    labels = torch.tensor([0, 2, -1, 1])
    whole = net(x, t, labels)
    single = torch.cat([net(x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_noise_label_changes_output(name):
    net = randomize_(tiny(name)).eval()
    x, _ = inputs()
    assert not torch.allclose(net(x, 0.1), net(x, 0.9), atol=1e-4)


def test_channels_last_gives_the_same_result():
    net = randomize_(tiny("ncsnpp")).eval()
    x, t = inputs()
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.contiguous(memory_format=torch.channels_last), t), ref,
                               atol=1e-5, rtol=1e-4)


def test_context_is_accepted_and_ignored():
    net = randomize_(tiny("ddpmpp")).eval()
    x, t = inputs()
    torch.testing.assert_close(net(x, t, context=torch.randn(4, 3, 8, 8)), net(x, t))


# ---------------------------------------------------------------------------------------------
# Class labels, label dropout, augmentation labels


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_class_label_changes_output_and_null_label_is_zero_one_hot(name):
    net = randomize_(tiny(name, label_dim=5)).eval()
    x, t = inputs()
    y0 = net(x, t, torch.tensor([0, 0, 0, 0]))
    y3 = net(x, t, torch.tensor([3, 3, 3, 3]))
    assert (y0 - y3).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every image reacts to its label
    null = net(x, t, torch.full([4], -1))
    torch.testing.assert_close(null, net(x, t))  # None = all null
    torch.testing.assert_close(null, net(x, t, torch.zeros(4, 5)))  # zero one-hot
    torch.testing.assert_close(y3, net(x, t, F.one_hot(torch.full([4], 3), 5).float()))


def test_songunet_scales_one_hot_by_sqrt_label_dim():
    net = tiny("ddpmpp", label_dim=9).eval()
    seen = []
    net.map_label.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x, t = inputs()
    net(x, t, torch.tensor([2, -1, 8, 0]))
    expected = torch.zeros(4, 9)
    expected[0, 2] = expected[2, 8] = expected[3, 0] = 3.0
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_label_dropout_one_ignores_labels_in_training_only(name):
    net = randomize_(tiny(name, label_dim=4, label_dropout=1.0, dropout=0.0))
    x, t = inputs()
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    net.train()
    torch.testing.assert_close(net(x, t, a), net(x, t, b))
    torch.testing.assert_close(net(x, t, a), net(x, t, None))
    net.eval()
    assert not torch.allclose(net(x, t, a), net(x, t, b), atol=1e-4)


def test_label_dropout_half_drops_whole_labels_with_global_rng():
    net = randomize_(tiny("ddpmpp", label_dim=2, label_dropout=0.5, dropout=0.0))
    n = 64
    x = torch.randn(1, 3, 8, 8).expand(n, -1, -1, -1)
    labels = torch.ones(n, dtype=torch.long)
    with torch.no_grad():
        net.eval()
        kept, null = net(x[:1], 0.2, labels[:1]), net(x[:1], 0.2, None)
        net.train()
        torch.manual_seed(123)
        out = net(x, 0.2, labels)
        torch.manual_seed(123)
        again = net(x, 0.2, labels)
    assert (kept - null).abs().max() > 0.01
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-4
    is_kept = (out - kept).flatten(1).abs().amax(1) < 1e-4
    assert bool((is_null ^ is_kept).all())  # each row is entirely one or the other
    assert 16 <= int(is_null.sum()) <= 48  # Binomial(64, 0.5): outside this range has p < 1e-4
    torch.testing.assert_close(out, again)  # reproducible from the global seed


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_augment_labels_matter_only_with_augment_dim(name):
    x, t = inputs()
    aug = torch.randn(4, 9)
    net = randomize_(tiny(name, augment_dim=9)).eval()
    assert not torch.allclose(net(x, t, augment_labels=aug), net(x, t), atol=1e-4)
    torch.testing.assert_close(net(x, t, augment_labels=torch.zeros(4, 9)), net(x, t))
    with pytest.raises(UserError, match="augment_labels"):
        net(x, t, augment_labels=torch.randn(4, 5))
    plain = randomize_(tiny(name)).eval()
    torch.testing.assert_close(plain(x, t, augment_labels=aug), plain(x, t))


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_bad_conditioning_raises_user_error(name):
    x, t = inputs()
    uncond = tiny(name).eval()
    with pytest.raises(UserError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1, 0, 1]))
    uncond(x, t, torch.full([4], -1))  # null labels are fine on an unconditional net
    cond = tiny(name, label_dim=3).eval()
    for bad in ([0, 1, 3, 0], [0, -2, 1, 1]):
        with pytest.raises(UserError, match="out of range"):
            cond(x, t, torch.tensor(bad))
    with pytest.raises(UserError, match="class_labels has 3"):
        cond(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(UserError, match="noise_labels has 3"):
        cond(x, torch.rand(3))


# ---------------------------------------------------------------------------------------------
# Initialisation, gradients, determinism


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp"])
def test_songunet_output_is_small_but_nonzero_at_init(name):
    net = tiny(name).eval()
    x, t = inputs()
    y = net(x, t)
    assert 0 < y.abs().max() < 1e-3  # output conv weights are 1e-5 times Xavier-uniform


def test_adm_output_is_exactly_zero_at_init():
    net = tiny("adm").eval()
    x, t = inputs()
    assert net(x, t).abs().max() == 0


@pytest.mark.parametrize(
    "name,extra",
    [("ddpmpp", {}), ("ncsnpp", {}), ("adm", {})]
    + [("ddpmpp", dict(encoder_type=e, decoder_type=d)) for e, d in SONG_VARIANTS],
)
def test_every_parameter_receives_gradient(name, extra):
    """No unused parameters (DDP needs none), and every one is on the loss's gradient path."""
    net = tiny(name, label_dim=3, augment_dim=9, **extra).train()
    x, t = inputs()
    labels, aug = torch.tensor([0, 1, 2, -1]), torch.randn(4, 9)
    net(x, t, labels, aug).square().sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    net.zero_grad(set_to_none=True)
    randomize_(net)
    net(x, t, labels, aug).square().sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_eval_is_deterministic_and_dropout_acts_in_training(name):
    net = randomize_(tiny(name, dropout=0.5))
    x, t = inputs()
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), rtol=0, atol=0)
    net.train()
    assert not torch.allclose(net(x, t), net(x, t), atol=1e-5)


def test_construction_is_reproducible_from_the_global_seed():
    a, b = tiny("ncsnpp"), tiny("ncsnpp")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert "map_noise.freqs" in a.state_dict()  # Fourier frequencies travel with the checkpoint


def test_meta_built_network_restored_from_state_dict_matches():
    """Everything forward needs (filters, Fourier frequencies) is in the state dict."""
    ref = randomize_(tiny("ncsnpp", resample_filter=[1, 3, 3, 1])).eval()
    with torch.device("meta"):
        net = build_network("ncsnpp", **TINY)
    net = net.to_empty(device="cpu").eval()
    net.load_state_dict(ref.state_dict())
    x, t = inputs()
    torch.testing.assert_close(net(x, t), ref(x, t), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Parameter counts of the full configurations against an independent closed-form count


def _block(cin, cout, emb, attn=False, resample=False, adaptive=False, proj_resample=True):
    n = 2 * cin + 9 * cin * cout + cout + (2 if adaptive else 1) * (emb * cout + cout) + 2 * cout
    n += 9 * cout * cout + cout
    if cin != cout or (resample and proj_resample):
        n += cin * cout + cout
    if attn:
        n += 2 * cout + 3 * cout * cout + 3 * cout + cout * cout + cout
    return n


def count_unet(kind, res, cin, cout_img, mc, mult, nb, attn_res, label_dim=0, cme=4, cmn=1):
    """Closed-form parameter count of the §5.5 architectures, written from the spec's description."""
    song = kind != "adm"
    emb, noise = mc * cme, (mc * cmn if song else mc)
    kw = dict(emb=emb, adaptive=not song, proj_resample=song)
    n = noise * emb + emb + emb * emb + emb  # two mapping layers
    if label_dim:
        n += label_dim * noise + noise if song else label_dim * emb  # ADM: no bias
    c = mc if song else mc * mult[0]
    n += 9 * cin * c + c
    skips, caux = [c], cin
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            n += _block(c, c, resample=True, **kw)
            skips.append(c)
            if kind == "ncsnpp":  # progressive-input residual branch: 3x3 conv caux -> c
                n += 9 * caux * c + c
                caux = c
        for _ in range(nb):
            n += _block(c, mc * m, attn=r in attn_res, **kw)
            c = mc * m
            skips.append(c)
    for level in reversed(range(len(mult))):
        r = res >> level
        if level == len(mult) - 1:
            n += _block(c, c, attn=True, **kw) + _block(c, c, **kw)
        else:
            n += _block(c, c, resample=True, **kw)
        for i in range(nb + 1):
            attn = r in attn_res and (i == nb or not song)
            n += _block(c + skips.pop(), mc * mult[level], attn=attn, **kw)
            c = mc * mult[level]
    return n + 2 * c + 9 * c * cout_img + cout_img  # output GroupNorm + 3x3 conv


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,label_dim,expected_m", [
    ("ddpmpp", 10, 56), ("ncsnpp", 10, 56), ("ddpmpp", 0, 56), ("adm", 1000, 296),
])
def test_full_configuration_parameter_counts(name, label_dim, expected_m):
    with torch.device("meta"):
        net = build_network(name, label_dim=label_dim)
    kw = network_kwargs_defaults(name)
    closed_form = count_unet(
        name, kw["img_resolution"], kw["in_channels"], kw["out_channels"], kw["model_channels"],
        kw["channel_mult"], kw["num_blocks"], kw["attn_resolutions"], label_dim=label_dim,
        cme=kw["channel_mult_emb"], cmn=kw.get("channel_mult_noise", 1),
    )
    count = n_params(net)
    print(f"{name} label_dim={label_dim}: {count} parameters (closed form {closed_form})")
    assert count == closed_form
    assert abs(count / 1e6 - expected_m) / expected_m < 0.02  # spec §5.5 ([R]): ~56M, ~296M


def test_tiny_configuration_counts_match_closed_form():
    for name in ("ddpmpp", "ncsnpp", "adm"):
        net = tiny(name, label_dim=3, img_resolution=16, channel_mult=[1, 2, 2], attn_resolutions=[8])
        kw = {**network_kwargs_defaults(name), **TINY}
        assert n_params(net) == count_unet(
            name, 16, 3, 3, 16, [1, 2, 2], 1, [8], label_dim=3, cmn=kw.get("channel_mult_noise", 1))


# ---------------------------------------------------------------------------------------------
# Registry


def test_unknown_network_and_option_raise_user_error():
    with pytest.raises(UserError, match="unknown network 'unet9000'") as err:
        build_network("unet9000")
    assert all(name in str(err.value) for name in ("adm", "ddpmpp", "ncsnpp"))
    with pytest.raises(UserError, match="num_heads"):
        build_network("ddpmpp", num_heads=4)
    with pytest.raises(UserError, match="encoder_type"):
        build_network("ddpmpp", **TINY, encoder_type="fancy")
    with pytest.raises(UserError, match="divisible"):
        build_network("adm", **{**TINY, "img_resolution": 7})


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_resolved_kwargs_are_json_and_rebuild_the_same_network(name):
    kw = json.loads(json.dumps(network_kwargs_defaults(name)))
    kw.update(TINY)
    torch.manual_seed(0)
    a = build_network(name, **kw)
    b = tiny(name)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_presets_differ_as_the_spec_says():
    ddpm, ncsn, adm = (network_kwargs_defaults(n) for n in ("ddpmpp", "ncsnpp", "adm"))
    assert (ddpm["embedding_type"], ncsn["embedding_type"]) == ("positional", "fourier")
    assert (ddpm["encoder_type"], ncsn["encoder_type"]) == ("standard", "residual")
    assert (ddpm["resample_filter"], ncsn["resample_filter"]) == ([1, 1], [1, 3, 3, 1])
    assert (ddpm["channel_mult_noise"], ncsn["channel_mult_noise"]) == (1, 2)
    assert ddpm["channel_mult"] == [2, 2, 2] and adm["channel_mult"] == [1, 2, 3, 4]


def test_other_modules_can_register_networks():
    class Identity(torch.nn.Module):
        def __init__(self, in_channels: int, gain: float = 1.0):
            super().__init__()
            self.gain = gain

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
            return x * self.gain

    register_network("test-identity", Identity, in_channels=3, gain=2.0)
    try:
        assert network_kwargs_defaults("test-identity") == dict(in_channels=3, gain=2.0)
        assert build_network("test-identity", gain=3.0).gain == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_network("test-identity", Identity)
    finally:
        del NETWORKS["test-identity"]


# ---------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("mode,bound,std", [
    ("xavier_uniform", math.sqrt(6 / 600), math.sqrt(2 / 600)),
    ("xavier_normal", None, math.sqrt(2 / 600)),
    ("kaiming_uniform", math.sqrt(3 / 200), math.sqrt(1 / 200)),
    ("kaiming_normal", None, math.sqrt(1 / 200)),
])
def test_weight_init_modes(mode, bound, std):
    torch.manual_seed(0)
    w = weight_init([400, 200], mode, fan_in=200, fan_out=400)
    assert abs(w.std().item() / std - 1) < 0.02
    if bound is not None:
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.99 * bound
    with pytest.raises(UserError, match="init_mode"):
        weight_init([2, 2], "orthogonal", 2, 2)


def test_positional_embedding_closed_form():
    x = torch.tensor([0.0, 1.0, 37.5])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, endpoint=endpoint)(x)
        freqs = torch.tensor([10000 ** (-j / (4 - endpoint)) for j in range(4)])
        torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * freqs),
                                                   torch.sin(x[:, None] * freqs)], 1))
    swapped = PositionalEmbedding(8, endpoint=True, sin_first=True)(x)
    torch.testing.assert_close(swapped, torch.cat([emb[:, 4:], emb[:, :4]], 1))
    assert emb[1, 3].item() == pytest.approx(math.cos(1e-4))  # endpoint: last frequency is 1/10000


def test_fourier_embedding_frequencies_and_form():
    torch.manual_seed(0)
    layer = FourierEmbedding(4000, scale=16)
    assert abs(layer.freqs.std().item() / 16 - 1) < 0.05
    x = torch.tensor([0.25, -1.0])
    arg = 2 * math.pi * x[:, None] * layer.freqs
    torch.testing.assert_close(layer(x), torch.cat([arg.cos(), arg.sin()], 1), atol=1e-4, rtol=1e-5)


def _resample_reference(x, f, up):
    """Direct per-axis sums: down out[o] = sum_k w_k x[2o+k-p]; up out[o] = sum_{2i+k-p=o} w_k x[i]."""
    f = torch.tensor(f, dtype=torch.float64)
    w = (2 if up else 1) * f / f.sum()
    p = (len(f) - 2) // 2

    def axis(v):  # resample the last axis
        n = v.shape[-1]
        out = torch.zeros(*v.shape[:-1], 2 * n if up else n // 2, dtype=torch.float64)
        for o in range(out.shape[-1]):
            for k in range(len(f)):
                if up:
                    if (o + p - k) % 2 == 0 and 0 <= (o + p - k) // 2 < n:
                        out[..., o] += w[k] * v[..., (o + p - k) // 2]
                elif 0 <= 2 * o + k - p < n:
                    out[..., o] += w[k] * v[..., 2 * o + k - p]
        return out

    return axis(axis(x.double()).transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("f", [[1, 1], [1, 3, 3, 1], [1, 2, 1, 1]])
def test_resampling_matches_direct_filter_sums(f):
    x = torch.randn(2, 3, 8, 8)
    kernel = resample_kernel(f)
    box = f == [1, 1]
    torch.testing.assert_close(downsample2d(x, kernel, box=box).double(), _resample_reference(x, f, False))
    torch.testing.assert_close(upsample2d(x, kernel, box=box).double(), _resample_reference(x, f, True))
    for layer, up in ((Conv2d(3, 3, 0, down=True, resample_filter=f), False),
                      (Conv2d(3, 3, 0, up=True, resample_filter=f), True)):
        torch.testing.assert_close(layer(x).double(), _resample_reference(x, f, up))


def test_fused_downsampling_conv_equals_conv_then_filter():
    torch.manual_seed(0)
    fused = Conv2d(3, 5, 3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True,
                   init_bias=1.0, init_mode="xavier_uniform")
    x = torch.randn(2, 3, 8, 8)
    full = F.conv2d(x, fused.weight, fused.bias, padding=2)  # 10x10, then unpadded strided filter
    w = torch.tensor([1, 3, 3, 1]) / 8
    expected = sum(w[k] * w[j] * full[..., k:k + 8:2, j:j + 8:2] for k in range(4) for j in range(4))
    torch.testing.assert_close(fused(x), expected)
    assert fused(x).shape == (2, 5, 4, 4)


def test_group_norm_groups_and_normalisation():
    assert GroupNorm(256).num_groups == 32
    assert GroupNorm(16).num_groups == 4
    gn = GroupNorm(200)  # 32 does not divide 200: the largest divisor below is used
    assert gn.num_groups == 25
    y = gn(torch.randn(2, 200, 4, 4) * 3 + 1).reshape(2, 25, -1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 25), atol=1e-5, rtol=0)


def test_self_attention_matches_softmax_formula():
    torch.manual_seed(0)
    heads, c, n, hw = 2, 8, 3, 4
    qkv = torch.randn(n, 3 * c, hw, hw)
    q, k, v = qkv.double().reshape(n, 3, heads, c // heads, hw * hw).unbind(1)
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(c // heads), dim=-1)
    expected = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(n, c, hw, hw)
    torch.testing.assert_close(self_attention(qkv, heads).double(), expected, atol=1e-5, rtol=1e-5)


def test_unet_block_skip_paths_and_heads():
    plain = UNetBlock(16, 16, 32)
    assert plain.skip is None and plain.num_heads == 0
    assert UNetBlock(16, 16, 32, down=True).skip.weight is None  # ADM: weightless resampling
    assert UNetBlock(16, 16, 32, down=True, resample_proj=True).skip.weight.shape == (16, 16, 1, 1)
    assert UNetBlock(16, 32, 32).skip.weight.shape == (32, 16, 1, 1)
    assert UNetBlock(256, 256, 32, attention=True).num_heads == 4  # 64 channels per head
    assert UNetBlock(16, 16, 32, attention=True).num_heads == 1
    block = UNetBlock(8, 8, 4, up=True)
    assert block(torch.randn(2, 8, 4, 4), torch.randn(2, 4)).shape == (2, 8, 8, 8)
