"""Score SDE's own NCSN++ / DDPM++ CIFAR-10 configurations as SongUNet presets (specs/gaussian_and_dddm.md
§4.2, §4.4; docs/networks.md "score-SDE NCSN++ / DDPM++").

The oracles are written from the reference (yang-song/score_sde_pytorch models/ncsnpp.py, layerspp.py,
up_or_down_sampling.py) in our own code: its layer list (parameter count), its forward loop (recomputed on
SongUNet's weights with plain torch ops in float64) and its FIR resampling (upfirdn in numpy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets import build_network, network_kwargs_defaults
from difflab.nets.layers import Conv2d

# The model section of configs/ve/cifar10_ncsnpp_continuous.py (deep: *_deep_continuous) and
# configs/vp|subvp/cifar10_ddpmpp_continuous.py (deep: subvp/cifar10_ddpmpp_deep_continuous.py), with
# data.centered. Every config has resblock_type "biggan", progressive "none", attention_type "ddpm",
# conditional True and init_scale 0, which are what SongUNet builds. Read at the stored commits 235991bc (models/)
# and c8c18d18 (configs/); ve/..._deep_continuous and subvp/cifar10_ddpmpp_continuous were read from
# forks (JacopoTeneggi/score_sde_pytorch, Khoronus/score_sde_pytorch; they add non-model keys only).
_COMMON = dict(nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1, fir_kernel=(1, 3, 3, 1),
               skip_rescale=True, progressive_combine="sum", fourier_scale=16)
_VE = dict(_COMMON, num_res_blocks=4, fir=True, progressive_input="residual", embedding_type="fourier",
           scale_by_sigma=True, centered=False)
_VP = dict(_COMMON, num_res_blocks=4, fir=False, progressive_input="none", embedding_type="positional",
           scale_by_sigma=False, centered=True)
REFERENCE = {
    "ncsnpp-sde": _VE,
    "ncsnpp-sde-deep": dict(_VE, num_res_blocks=8),
    "ddpmpp-sde": _VP,
    "ddpmpp-sde-deep": dict(_VP, num_res_blocks=8),
}
NAMES = list(REFERENCE)
SQRT2 = math.sqrt(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomize_(net: nn.Module, seed: int = 1) -> nn.Module:
    """O(1)-scale weights, so the (near-)zero-initialised branches carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


# ---------------------------------------------------------------------------------------------
# The reference's FIR resampling in numpy (up_or_down_sampling.upsample_2d / downsample_2d / conv_downsample_2d)


def upfirdn_np(x: np.ndarray, f, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Separable upfirdn on the last two axes: zero-insert ``up``, zero-pad ``pad``, convolve with the
    normalised ``f`` (times ``up`` per axis, so a constant keeps its value), keep every ``down``-th."""
    taps = np.asarray(f, dtype=np.float64)
    taps = taps / taps.sum() * up

    def axis(v: np.ndarray) -> np.ndarray:
        z = np.zeros(len(v) * up)
        z[::up] = v
        return np.convolve(np.pad(z, pad), taps, mode="valid")[::down]

    return np.apply_along_axis(axis, -2, np.apply_along_axis(axis, -1, x))


def fir_pads(f, conv_kernel: int = 1, up: bool = False) -> tuple[int, int]:
    """The reference's padding: ``p = len(f) - 2 + (kernel - 1)``, split ``((p+1)//2, p//2)``, plus
    ``factor - 1`` in front when upsampling."""
    p = len(f) - 2 + conv_kernel - 1
    return ((p + 1) // 2 + (1 if up else 0), p // 2)


def conv_np(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1) -> np.ndarray:
    """Unpadded (valid) cross-correlation ``out[n,o,i,j] = sum w[o,c,a,b] x[n,c,s i+a,s j+b] + b[o]``."""
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(-2, -1))[..., ::stride, ::stride, :, :]
    return np.einsum("ncijab,ocab->noij", win, w) + b[None, :, None, None]


def naive_up_np(x):
    return x.repeat(2, axis=-2).repeat(2, axis=-1)


def naive_down_np(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


@pytest.mark.parametrize("f", [[1, 3, 3, 1], [1, 1]])
def test_fir_resampling_equals_numpy_upfirdn_with_the_reference_padding(f):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8))
    xt = torch.from_numpy(x).float()
    down = Conv2d(3, 3, 0, down=True, resample_filter=f)(xt).double().numpy()
    up = Conv2d(3, 3, 0, up=True, resample_filter=f)(xt).double().numpy()
    np.testing.assert_allclose(down, upfirdn_np(x, f, down=2, pad=fir_pads(f)), atol=1e-6)
    np.testing.assert_allclose(up, upfirdn_np(x, f, up=2, pad=fir_pads(f, up=True)), atol=1e-6)
    if f == [1, 1]:  # DDPM++ (fir=False): the reference's naive mean-pool / nearest resampling
        np.testing.assert_allclose(down, naive_down_np(x), atol=1e-6)
        np.testing.assert_allclose(up, naive_up_np(x), atol=1e-6)
    else:  # the filter is normalised: a constant image keeps its value away from the zero border
        ones = np.ones((1, 1, 8, 8))
        np.testing.assert_allclose(upfirdn_np(ones, f, down=2, pad=fir_pads(f))[..., 1:3, 1:3], 1.0)
        np.testing.assert_allclose(upfirdn_np(ones, f, up=2, pad=fir_pads(f, up=True))[..., 2:6, 2:6], 1.0)

    # The progressive-input branch (conv_downsample_2d): FIR with the padding for a 3x3 conv, then the strided
    # unpadded conv. (With fir=False the reference's branch is another op, pad (0,1) + strided conv; no config uses it.)
    torch.manual_seed(0)
    fused = Conv2d(3, 5, 3, down=True, resample_filter=f, fused_resample=True, init_mode="xavier_uniform",
                   init_bias=1.0)
    w, b = fused.weight.detach().double().numpy(), fused.bias.detach().double().numpy()
    expected = conv_np(upfirdn_np(x, f, pad=fir_pads(f, conv_kernel=3)), w, b, stride=2)
    np.testing.assert_allclose(fused(xt).detach().double().numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The presets are the reference configs


@pytest.mark.parametrize("name", NAMES)
def test_presets_translate_the_reference_config(name):
    ref, kw = REFERENCE[name], network_kwargs_defaults(name)
    assert (kw["img_resolution"], kw["in_channels"], kw["out_channels"]) == (32, 3, 3)
    assert kw["model_channels"] == ref["nf"] and kw["channel_mult_emb"] == 4  # temb_dim = 4 nf
    assert kw["channel_mult"] == list(ref["ch_mult"]) and kw["num_blocks"] == ref["num_res_blocks"]
    assert kw["attn_resolutions"] == list(ref["attn_resolutions"]) and kw["dropout"] == ref["dropout"]
    assert kw["resample_filter"] == (list(ref["fir_kernel"]) if ref["fir"] else [1, 1])
    assert kw["encoder_type"] == {"residual": "residual", "none": "standard"}[ref["progressive_input"]]
    assert kw["decoder_type"] == "standard"  # progressive "none"
    assert kw["embedding_type"] == ref["embedding_type"]
    # Fourier: embedding_size nf frequencies -> 2 nf features; positional: nf features.
    assert kw["channel_mult_noise"] == (2 if ref["embedding_type"] == "fourier" else 1)
    assert kw["fourier_scale"] == ref["fourier_scale"]


def reference_param_count(cfg: dict, res: int = 32, channels: int = 3) -> int:
    """``sum(p.numel() for p in NCSNpp(config).parameters())`` from the reference's module list."""
    nf, ch_mult, nrb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
    temb = 4 * nf

    def conv(a, b, k):
        return k * k * a * b + b

    def resblock(cin, cout=None, resample=False):  # ResnetBlockBigGANpp
        cout = cout or cin
        n = 2 * cin + conv(cin, cout, 3) + temb * cout + cout + 2 * cout + conv(cout, cout, 3)
        return n + (conv(cin, cout, 1) if cin != cout or resample else 0)

    def attn(c):  # AttnBlockpp: GroupNorm and four NINs
        return 2 * c + 4 * (c * c + c)

    fourier = cfg["embedding_type"] == "fourier"
    n = nf if fourier else 0  # GaussianFourierProjection.W: a frozen nn.Parameter of nf entries
    embed = 2 * nf if fourier else nf
    n += embed * temb + temb + temb * temb + temb
    n += conv(channels, nf, 3)
    hs, cin, pyramid = [nf], nf, channels
    levels = len(ch_mult)
    for i in range(levels):
        for _ in range(nrb):
            n += resblock(cin, nf * ch_mult[i])
            cin = nf * ch_mult[i]
            n += attn(cin) if res >> i in cfg["attn_resolutions"] else 0
            hs.append(cin)
        if i != levels - 1:
            n += resblock(cin, resample=True)
            if cfg["progressive_input"] == "residual":
                n += conv(pyramid, cin, 3)
                pyramid = cin
            hs.append(cin)
    n += resblock(cin) + attn(cin) + resblock(cin)
    for i in reversed(range(levels)):
        for _ in range(nrb + 1):
            n += resblock(cin + hs.pop(), nf * ch_mult[i])
            cin = nf * ch_mult[i]
        n += attn(cin) if res >> i in cfg["attn_resolutions"] else 0
        n += resblock(cin, resample=True) if i != 0 else 0
    assert not hs
    return n + 2 * cin + conv(cin, channels, 3)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_the_reference_layer_list(name):
    ref = REFERENCE[name]
    fourier = ref["embedding_type"] == "fourier"  # the reference's W (nf entries) is a frozen parameter; ours a buffer
    for nf in (128, 16):
        with torch.device("meta"):
            net = build_network(name, model_channels=nf)
        count, expected = n_params(net), reference_param_count(dict(ref, nf=nf))
        print(f"{name} nf={nf}: {count} parameters; reference module list {expected}")
        assert count + (nf if fourier else 0) == expected


# ---------------------------------------------------------------------------------------------
# The forward pass is the reference's


def reference_forward(net: nn.Module, cfg: dict, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
    """NCSNpp.forward (biggan blocks, progressive "none") in float64, reading SongUNet's weights in the
    reference's module order. ``time_cond``: sigma (Fourier; the reference takes its log) or 999 t."""
    d = lambda p: p.detach().double()
    act = F.silu
    f = cfg["fir_kernel"]
    res_of = {h: h in cfg["attn_resolutions"] for h in (32, 16, 8, 4, 2, 1)}

    def skip_sum(a, b):
        return (a + b) / SQRT2 if cfg["skip_rescale"] else a + b

    def gn(h, norm):  # the reference's rule: min(C // 4, 32) groups, eps 1e-6
        return F.group_norm(h, min(h.shape[1] // 4, 32), d(norm.weight), d(norm.bias), eps=1e-6)

    def conv(h, layer, stride=1, padding=None):
        w = d(layer.weight)
        return F.conv2d(h, w, d(layer.bias), stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)

    def linear(h, layer):
        return h @ d(layer.weight).T + d(layer.bias)

    def resample(h, up):
        a = h.numpy()
        if cfg["fir"]:
            a = upfirdn_np(a, f, up=2, pad=fir_pads(f, up=True)) if up else upfirdn_np(a, f, down=2, pad=fir_pads(f))
        else:
            a = naive_up_np(a) if up else naive_down_np(a)
        return torch.from_numpy(np.ascontiguousarray(a))

    def resblock(block, h_in, temb, up=False, down=False):  # ResnetBlockBigGANpp.forward
        h = act(gn(h_in, block.norm0))
        x_skip = h_in
        if up or down:
            h, x_skip = resample(h, up), resample(h_in, up)
        h = conv(h, block.conv0)
        h = h + linear(act(temb), block.affine)[:, :, None, None]
        h = conv(act(gn(h, block.norm1)), block.conv1)
        if x_skip.shape[1] != h.shape[1] or up or down:
            x_skip = conv(x_skip, block.skip)
        return skip_sum(x_skip, h)

    def attention(block, h_in):  # AttnBlockpp.forward; q, k, v are the thirds of our qkv (one head)
        c = h_in.shape[1]
        h = gn(h_in, block.norm2)
        w, b = d(block.qkv.weight)[:, :, 0, 0], d(block.qkv.bias)
        q, k, v = (torch.einsum("oc,nchw->nohw", w[i * c:(i + 1) * c], h) + b[i * c:(i + 1) * c, None, None]
                   for i in range(3))
        a = torch.einsum("bchw,bcij->bhwij", q, k) * c ** -0.5
        a = torch.softmax(a.reshape(*a.shape[:3], -1), dim=-1).reshape(a.shape)
        return skip_sum(h_in, conv(torch.einsum("bhwij,bcij->bchw", a, v), block.proj))

    x, time_cond = x.double(), time_cond.double()
    if cfg["embedding_type"] == "fourier":
        proj = torch.log(time_cond)[:, None] * d(net.map_noise.freqs)[None] * 2 * math.pi
        temb = torch.cat([proj.sin(), proj.cos()], dim=1)
    else:  # get_timestep_embedding(t, nf)
        half = cfg["nf"] // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
        temb = torch.cat([(time_cond[:, None] * freqs).sin(), (time_cond[:, None] * freqs).cos()], dim=1)
    temb = linear(act(linear(temb, net.map_layer0)), net.map_layer1)
    if not cfg["centered"]:
        x = 2 * x - 1

    levels = len(cfg["ch_mult"])
    pyramid = x
    hs = [conv(x, net.enc_in)]
    for i in range(levels):
        for block in net.enc[i].blocks:
            h = resblock(block, hs[-1], temb)
            if res_of[x.shape[-1] >> i]:
                h = attention(block, h)
            hs.append(h)
        if i != levels - 1:
            h = resblock(net.enc[i + 1].down, hs[-1], temb, down=True)
            if cfg["progressive_input"] == "residual":
                side = net.enc_aux[i]
                blurred = torch.from_numpy(upfirdn_np(pyramid.numpy(), f, pad=fir_pads(f, conv_kernel=3)))
                pyramid = skip_sum(conv(blurred, side, stride=2, padding=0), h)
                h = pyramid
            hs.append(h)

    mid_attn, mid = net.dec[0].head
    h = resblock(mid, attention(mid_attn, resblock(mid_attn, hs[-1], temb)), temb)
    for i in reversed(range(levels)):
        stage = net.dec[levels - 1 - i]
        for block in stage.blocks:
            h = resblock(block, torch.cat([h, hs.pop()], dim=1), temb)
        if res_of[x.shape[-1] >> i]:
            h = attention(stage.blocks[-1], h)
        if i != 0:
            h = resblock(net.dec[levels - i].head[0], h, temb, up=True)
    assert not hs
    out = net.dec_aux[0]
    h = conv(act(gn(h, out.norm)), out.conv)
    if cfg["scale_by_sigma"]:
        h = h / time_cond[:, None, None, None]
    return h


@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_the_reference_forward_loop(name):
    """Full structure at 32x32 with nf=16. VE: the reference sees [0,1] data and sigma; the method must feed
    SongUNet ``2x - 1`` and ``ln sigma`` and divide by sigma. VP/sub-VP: both see centred data and 999 t."""
    cfg = dict(REFERENCE[name], nf=16)
    torch.manual_seed(0)
    net = randomize_(build_network(name, model_channels=16)).eval()
    g = torch.Generator().manual_seed(0)
    if cfg["embedding_type"] == "fourier":
        x = torch.rand(3, 3, 32, 32, generator=g)  # [0, 1]
        sigma = torch.tensor([0.01, 0.7, 50.0])
        with torch.no_grad():
            ours = net(2 * x - 1, sigma.log()) / sigma[:, None, None, None]
        ref = reference_forward(net, cfg, x, sigma)
    else:
        x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
        t999 = 999 * torch.tensor([1e-3, 0.4, 1.0])
        with torch.no_grad():
            ours = net(x, t999)
        ref = reference_forward(net, cfg, x, t999)
    scale = ref.abs().max().item()
    assert scale > 1e-2  # the randomised branches carry signal
    torch.testing.assert_close(ours.double(), ref, atol=2e-4 * scale, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Progressive input, deep variants, training step


class Recorder(nn.Module):
    """Stub layer: records its first input and returns a fixed tensor."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x, *args):
        self.seen.append(x.detach().clone())
        return self.value


def _first_block_inputs(net):
    seen = []
    for level in net.enc[1:]:
        level.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_progressive_input_residual_and_skip_combine_arithmetic():
    """Reference "residual": pyramid <- (conv_down(pyramid) + h) / sqrt 2 and h <- pyramid; "input_skip"
    with combine "sum" (our encoder_type "skip"): pyramid <- downsample(pyramid), h <- conv1x1(pyramid) + h."""
    n, g = 2, torch.Generator().manual_seed(0)
    shapes = [(n, 16, 8, 8), (n, 32, 4, 4)]  # after the down block of levels 1 and 2 (nf 16, mult [1, 2, 2])
    a, b, s = ([torch.randn(sh, generator=g) for sh in shapes] for _ in range(3))
    x = torch.randn(n, 3, 16, 16, generator=g)
    kw = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[])

    net = build_network("ncsnpp-sde", **kw)
    for level in (1, 2):
        net.enc[level].down = Recorder(a[level - 1])
        net.enc_aux[level - 1] = Recorder(b[level - 1])
    seen = _first_block_inputs(net)
    net(x, torch.zeros(n))
    combined = [(a[i] + b[i]) / SQRT2 for i in range(2)]
    torch.testing.assert_close(seen, combined)
    torch.testing.assert_close(net.enc_aux[0].seen[0], x)  # the pyramid starts at the input image
    torch.testing.assert_close(net.enc_aux[1].seen[0], combined[0])  # and carries the combined features

    net = build_network("ncsnpp-sde", **kw, encoder_type="skip")
    pooled = [torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 4, 4, generator=g)]
    for level in (1, 2):
        net.enc[level].down = Recorder(a[level - 1])
        net.enc_aux[level - 1]["down"] = Recorder(pooled[level - 1])
        net.enc_aux[level - 1]["skip"] = Recorder(s[level - 1])
    seen = _first_block_inputs(net)
    net(x, torch.zeros(n))
    torch.testing.assert_close(seen, [a[i] + s[i] for i in range(2)])
    torch.testing.assert_close(net.enc_aux[0]["down"].seen[0], x)
    torch.testing.assert_close(net.enc_aux[1]["down"].seen[0], pooled[0])  # the image pyramid, not features
    torch.testing.assert_close(net.enc_aux[1]["skip"].seen[0], pooled[1])


@pytest.mark.parametrize("base", ["ncsnpp-sde", "ddpmpp-sde"])
def test_deep_variant_has_eight_blocks_per_level_and_nothing_else_changes(base):
    deep = f"{base}-deep"
    assert {k: v for k, v in network_kwargs_defaults(deep).items() if k != "num_blocks"} == \
        {k: v for k, v in network_kwargs_defaults(base).items() if k != "num_blocks"}
    for name, blocks in ((base, 4), (deep, 8)):
        with torch.device("meta"):
            net = build_network(name)
        assert [len(level.blocks) for level in net.enc] == [blocks] * 4
        assert [len(level.blocks) for level in net.dec] == [blocks + 1] * 4


@pytest.mark.parametrize("name", NAMES)
def test_registered_config_trains_one_step_at_32px(name):
    torch.manual_seed(0)
    net = build_network(name, model_channels=16).train()
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0.5, 10.0]).log() if "ncsnpp" in name else torch.tensor([10.0, 900.0])
    out = net(x, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out - x).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()] == []
