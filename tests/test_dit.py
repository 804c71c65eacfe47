"""DiT backbone (difflab/nets/dit.py; Peebles & Xie 2023): layout, adaLN-Zero, conditioning, parameter
counts against the paper's Table 1, and every method family on top of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.build import build_model
from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.nets import build_network, network_kwargs_defaults
from difflab.nets.dit import (
    DIT_CONFIGS,
    DIT_PAPER_PARAMS_M,
    DiT,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)
from difflab.rng import StackedRandomGenerator

TINY = dict(img_resolution=8, in_channels=3, out_channels=3, hidden_size=32, depth=2, num_heads=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs) -> DiT:
    torch.manual_seed(0)
    return build_network("dit", **{**TINY, **kwargs})


def randomize_(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """O(1)-scale weights everywhere, so the zero-initialised adaLN and output layers carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


def inputs(n: int = 4, c: int = 3, res: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, res, res, generator=g), torch.rand(n, generator=g) * 2 - 1


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every image of the batch changed."""
    return bool(((a - b).flatten(1).abs().amax(1) > 1e-4).all())


# ---------------------------------------------------------------------------------------------
# Layout: patches, positions, shapes


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    tok = patchify(x, p)
    assert tok.shape == (2, 2 * 3, p * p * 3)
    # token i*(W/p)+j, feature (a*p + b)*C + c  <->  pixel x[n, c, i*p + a, j*p + b]
    for (n, i, j, a, b, c) in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 1, 0, 2, 3, 1), (1, 0, 2, 1, 0, 0)]:
        assert tok[n, i * 3 + j, (a * p + b) * 3 + c] == x[n, c, i * p + a, j * p + b]
    sq = torch.randn(2, 5, 8, 8)
    for p in (1, 2, 4, 8):
        assert torch.equal(unpatchify(patchify(sq, p), p, 5, 8 // p), sq)
        t = torch.randn(2, (8 // p) ** 2, p * p * 5)
        assert torch.equal(patchify(unpatchify(t, p, 5, 8 // p), p), t)


def test_patch_embedding_is_a_linear_map_of_each_patch():
    net = tiny(patch_size=4)
    x, _ = inputs()
    w = net.patch_embed.weight.permute(0, 2, 3, 1).reshape(32, -1)  # (row, column, channel) like patchify
    expected = patchify(x, 4) @ w.T + net.patch_embed.bias
    torch.testing.assert_close(net.patch_embed(x).flatten(2).transpose(1, 2), expected)


def numpy_sincos_2d(dim: int, size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed, written from the formula: meshgrid(w, h), first half from the
    column coordinate, second half from the row; each half [sin(pos w_k), cos(pos w_k)]."""
    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))  # xy indexing
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def one_d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(grid[0]), one_d(grid[1])], axis=1)


@pytest.mark.parametrize("dim,size", [(32, 4), (384, 16), (8, 3)])
def test_pos_embed_equals_numpy_formula(dim, size):
    ours = sincos_pos_embed_2d(dim, size).double().numpy()
    np.testing.assert_allclose(ours, numpy_sincos_2d(dim, size), atol=2e-6, rtol=0)
    net = tiny(hidden_size=dim, num_heads=4, img_resolution=2 * size)
    assert torch.equal(net.pos_embed[0], sincos_pos_embed_2d(dim, size))
    assert "pos_embed" in net.state_dict() and "pos_embed" not in dict(net.named_parameters())


def test_noise_embedding_is_dits_frequency_embedding():
    """DiT's TimestepEmbedder: [cos(t f), sin(t f)], f_k = exp(-ln(10000) k / 128), 256 channels."""
    net = tiny()
    t = np.array([0.0, 0.7, -1.3, 999.0])
    f = np.exp(-math.log(10000) * np.arange(128) / 128)
    expected = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)
    np.testing.assert_allclose(net.map_noise(torch.tensor(t)).double().numpy(), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("res,patch", [(8, 1), (8, 2), (8, 4), (16, 4), (16, 8)])
def test_output_shape_for_patch_sizes(res, patch):
    net = randomize_(tiny(img_resolution=res, patch_size=patch, out_channels=6)).eval()
    x, t = inputs(res=res)
    y = net(x, t)
    assert y.shape == (4, 6, res, res) and torch.isfinite(y).all()


def test_scalar_noise_label_broadcasts_and_context_is_ignored():
    net = randomize_(tiny()).eval()
    x, _ = inputs()
    torch.testing.assert_close(net(x, 0.3), net(x, torch.full([4], 0.3)))
    torch.testing.assert_close(net(x, 0.3, context=torch.randn(4, 7)), net(x, 0.3))


def test_each_image_is_processed_independently_of_the_batch():
    net = randomize_(tiny(label_dim=3)).eval()
    x, t = inputs()
    labels = torch.tensor([0, 2, -1, 1])
    whole = net(x, t, labels)
    single = torch.cat([net(x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# adaLN-Zero


def test_adaln_zero_output_is_exactly_zero_and_blocks_are_identity_at_init():
    net = tiny(label_dim=5).eval()
    x, t = inputs()
    assert net(x, t, torch.tensor([0, 1, 4, -1])).abs().max() == 0
    h, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    for block in net.blocks:
        assert torch.equal(block(h, c), h)


def test_perturbed_final_layer_gives_linear_readout_of_the_patch_tokens():
    """With the blocks still the identity, out = unpatchify(LN(patch_embed(x) + pos) W^T + b)."""
    net = tiny(patch_size=2, out_channels=2).eval()
    with torch.no_grad():
        net.final.linear.weight.normal_()
        net.final.linear.bias.normal_()
    x, t = inputs()
    y = net(x, t)
    assert y.abs().max() > 0.1
    h = net.patch_embed(x).flatten(2).transpose(1, 2) + net.pos_embed
    expected = unpatchify(net.final.linear(F.layer_norm(h, (32,), eps=1e-6)), 2, 2, 4)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_block_modulation_order_is_shift_scale_gate_for_attention_then_mlp(branch):
    """Modulation bias = (shift, scale, gate) in one branch's slots, zeros in the other's (gate 0: off)."""
    net = tiny()
    block = net.blocks[0]
    randomize_(block)
    a, b, g = torch.randn(3, 32)
    first = branch == "attention"
    with torch.no_grad():
        block.modulation.weight.zero_()
        block.modulation.bias.zero_()
        block.modulation.bias[(0 if first else 96):(96 if first else 192)] = torch.cat([a, b, g])
    h = torch.randn(2, 16, 32)
    f = block.attention if first else block.mlp
    expected = h + g * f(F.layer_norm(h, (32,), eps=1e-6) * (1 + b) + a)
    torch.testing.assert_close(block(h, torch.randn(2, 32)), expected)


def test_attention_matches_softmax_formula():
    net = randomize_(tiny())
    block = net.blocks[0]
    h = torch.randn(2, 16, 32)
    q, k, v = block.qkv(h).double().reshape(2, 16, 3, 4, 8).unbind(2)  # [N, T, heads, 8]
    w = torch.softmax(torch.einsum("nqhc,nkhc->nhqk", q, k) / math.sqrt(8), dim=-1)
    o = torch.einsum("nhqk,nkhc->nqhc", w, v).reshape(2, 16, 32)
    expected = o @ block.proj.weight.double().T + block.proj.bias.double()
    torch.testing.assert_close(block.attention(h).double(), expected, atol=1e-5, rtol=1e-5)


def test_mlp_is_ratio_4_with_tanh_gelu():
    block = randomize_(tiny()).blocks[0]
    assert block.fc1.out_features == 4 * 32
    h = torch.randn(2, 16, 32)
    u = (h @ block.fc1.weight.T + block.fc1.bias).double()
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))  # GELU, tanh approx.
    expected = gelu @ block.fc2.weight.double().T + block.fc2.bias.double()
    torch.testing.assert_close(block.mlp(h).double(), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Conditioning


def test_output_depends_on_noise_labels():
    net = randomize_(tiny()).eval()
    x, _ = inputs()
    assert differs(net(x, 0.1), net(x, 0.9))
    assert differs(net(x, 10.0), net(x, 11.0))  # DDPM-scale timesteps are resolved too


def test_class_labels_matter_and_null_label_is_no_label():
    net = randomize_(tiny(label_dim=5)).eval()
    x, t = inputs()
    y0, y3 = net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, torch.full([4], 3))
    assert differs(y0, y3)
    null = net(x, t, torch.full([4], -1))
    torch.testing.assert_close(null, net(x, t))
    torch.testing.assert_close(null, net(x, t, torch.zeros(4, 5)))
    torch.testing.assert_close(y3, net(x, t, F.one_hot(torch.full([4], 3), 5).float()))
    assert differs(null, y0)
    # null = zero class embedding: the same weights without a label map give the same output
    plain = tiny().eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("map_label")})
    torch.testing.assert_close(null, plain(x, t))


def test_label_dropout_one_gives_the_null_label_in_training_only():
    net = randomize_(tiny(label_dim=4, label_dropout=1.0))
    x, t = inputs()
    a = torch.tensor([0, 1, 2, 3])
    net.eval()
    null = net(x, t)
    assert differs(net(x, t, a), null)
    net.train()
    torch.testing.assert_close(net(x, t, a), null)


def test_augment_labels_matter_only_with_augment_dim():
    x, t = inputs()
    aug = torch.randn(4, 9)
    net = randomize_(tiny(augment_dim=9)).eval()
    assert net.map_augment.bias is None
    assert differs(net(x, t, augment_labels=aug), net(x, t))
    torch.testing.assert_close(net(x, t, augment_labels=torch.zeros(4, 9)), net(x, t))
    plain = randomize_(tiny()).eval()
    torch.testing.assert_close(plain(x, t, augment_labels=aug), plain(x, t))


def test_bad_conditioning_raises_user_error():
    x, t = inputs()
    with pytest.raises(UserError, match="unconditional"):
        tiny()(x, t, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(UserError, match="out of range"):
        tiny(label_dim=3)(x, t, torch.tensor([0, 1, 3, 0]))


def test_dropout_acts_in_training_and_eval_is_deterministic():
    net = randomize_(tiny(dropout=0.5))
    x, t = inputs()
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert differs(net(x, t), net(x, t))


def test_every_parameter_receives_gradient():
    net = randomize_(tiny(label_dim=3, augment_dim=9)).train()
    x, t = inputs()
    net(x, t, torch.tensor([0, 1, 2, -1]), torch.randn(4, 9)).square().sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0] == []


# ---------------------------------------------------------------------------------------------
# Bad configurations and inputs: one line naming the option


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_resolution=10, patch_size=4), "patch_size"),
    (dict(img_resolution=8, patch_size=3), "patch_size"),
    (dict(hidden_size=30, num_heads=3), "hidden_size"),
    (dict(hidden_size=32, num_heads=3), "num_heads"),
    (dict(depth=0), "depth"),
])
def test_bad_configuration_is_one_line_user_error(kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        tiny(**kwargs)
    assert "\n" not in str(err.value)


def test_wrong_image_size_at_call_is_one_line_user_error():
    net = tiny()
    with pytest.raises(UserError, match="img_resolution") as err:
        net(torch.randn(2, 3, 16, 16), 0.1)
    assert "\n" not in str(err.value)


def test_meta_built_network_restored_from_state_dict_matches():
    ref = randomize_(tiny(label_dim=3)).eval()
    with torch.device("meta"):
        net = build_network("dit", **TINY, label_dim=3)
    net = net.to_empty(device="cpu").eval()
    net.load_state_dict(ref.state_dict())
    x, t = inputs()
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1, 2, -1])), ref(x, t, torch.tensor([0, 1, 2, -1])),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Parameter counts: the paper's Table 1 (32x32x4 latents, patch 2, 1000 classes, learned sigma)


def count_dit(h: int, depth: int, p: int = 2, cin: int = 4, cout: int = 8, res: int = 32, classes: int = 1000,
              freq: int = 256, mlp_ratio: int = 4) -> int:
    """Closed form: patch embedding, noise MLP, class table, blocks, final layer (pos embed is a buffer)."""
    block = (3 * h * h + 3 * h) + (h * h + h) + 2 * mlp_ratio * h * h + mlp_ratio * h + h + (6 * h * h + 6 * h)
    final = (2 * h * h + 2 * h) + (h * p * p * cout + p * p * cout)
    return (cin * p * p * h + h) + (freq * h + h + h * h + h) + classes * h + depth * block + final


@pytest.mark.parametrize("size", list(DIT_CONFIGS))
def test_paper_configuration_parameter_counts(size):
    hidden, depth, heads = DIT_CONFIGS[size]
    with torch.device("meta"):
        net = build_network(f"dit-{size}", img_resolution=32, in_channels=4, out_channels=8, label_dim=1000)
    assert (net.blocks[0].num_heads, len(net.blocks)) == (heads, depth)
    count = sum(p.numel() for p in net.parameters())
    print(f"DiT-{size.upper()}/2: {count:,} parameters")
    assert count == count_dit(hidden, depth)
    paper = DIT_PAPER_PARAMS_M[size] * 1e6
    assert abs(count - paper) / paper < 0.01


def test_default_dit_is_dit_s2_at_cifar10_size():
    kw = network_kwargs_defaults("dit")
    assert (kw["hidden_size"], kw["depth"], kw["num_heads"], kw["patch_size"]) == (*DIT_CONFIGS["s"], 2)
    assert (kw["img_resolution"], kw["in_channels"], kw["out_channels"]) == (32, 3, 3)


# ---------------------------------------------------------------------------------------------
# Every method family builds on DiT, trains (loss + backward) and samples


METHODS = [
    ({"name": "edm"}, 1, {"steps": 3}),
    ({"name": "vp"}, 1, {"steps": 3}),
    ({"name": "ve"}, 1, {"steps": 3}),
    ({"name": "iddpm"}, 2, {"steps": 3}),
    ({"name": "ddpm"}, 1, {"sampler": "ddim", "steps": 3}),
    ({"name": "ddpm", "learn_sigma": True}, 2, {"sampler": "ancestral", "steps": 3}),
    ({"name": "sdd"}, 1, {"steps": 3}),
    ({"name": "betadiff"}, 1, {"steps": 3}),
]


@pytest.mark.parametrize("method,out_mult,sample_kw", METHODS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_every_method_trains_and_samples_on_dit(method, out_mult, sample_kw):
    cfg = RunConfig.from_dict({"data": {"source": "digits", "resolution": 8}, "method": dict(method),
                               "network": {"name": "dit", "hidden_size": 32, "depth": 2, "num_heads": 4,
                                           "label_dropout": 0.1}})
    cfg.image = {"channels": 1, "resolution": 8, "label_dim": 10, "augment_dim": 0}
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.net, DiT) and model.net.out_channels == out_mult
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 3, 9, -1])
    model.train()
    loss = model.loss(model.encode(images), labels, StackedRandomGenerator("cpu", range(4)))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert model.net.final.linear.weight.grad.abs().max() > 0  # the zero-initialised output layer learns
    model.eval()
    x = model.sample(StackedRandomGenerator("cpu", [0, 1]), class_labels=torch.tensor([2, -1]), **sample_kw)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
