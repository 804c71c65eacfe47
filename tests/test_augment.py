"""Non-leaky augmentation (specs/gaussian_and_dddm.md §5.6): label layout, geometry, per-seed randomness."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.data import AugmentPipe, augment_dim
from difflab.rng import StackedRandomGenerator

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


class FixedDraws:
    """Stands in for StackedRandomGenerator with chosen uniforms [N,10] and normals [N,4]."""

    def __init__(self, u, z):
        self.u, self.z = torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(z, dtype=torch.float64)

    def rand(self, size, dtype=torch.float32):
        assert tuple(size) == tuple(self.u.shape)
        return self.u.to(dtype)

    def randn(self, size, dtype=torch.float32):
        assert tuple(size) == tuple(self.z.shape)
        return self.z.to(dtype)


def draws(n=1, **cols):
    """Uniforms default to 0.999 (every gate shut), normals to 0; override columns by index."""
    u = torch.full((n, 10), 0.999, dtype=torch.float64)
    z = torch.zeros(n, 4, dtype=torch.float64)
    for k, v in cols.items():
        kind, col = k[0], int(k[1:])
        (u if kind == "u" else z)[:, col] = torch.as_tensor(v, dtype=torch.float64)
    return FixedDraws(u, z)


def images(n=4, c=3, h=8, w=8, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_p_zero_is_identity_with_zero_labels():
    x = images(6)
    out, labels = AugmentPipe(p=0)(x, StackedRandomGenerator("cpu", range(6)))
    assert augment_dim == 9 and labels.shape == (6, 9) and labels.dtype == torch.float32
    assert torch.equal(out, x) and not labels.any()  # 1e8 * 0 = 0: even the x-flip gate stays shut


def test_pure_xflip_and_yflip_match_torch_flip():
    x = images(2)
    out, labels = AugmentPipe(p=1, **{**OFF, "xflip": 1})(x, draws(2, u0=0.0, u1=[0.2, 0.7]))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])
    assert labels[:, 0].tolist() == [1, 0] and not labels[:, 1:].any()
    out, labels = AugmentPipe(p=1, **{**OFF, "yflip": 1})(x, draws(2, u2=0.0, u3=[0.2, 0.7]))
    assert torch.equal(out[0], x[0].flip(1)) and torch.equal(out[1], x[1])
    assert labels[:, 1].tolist() == [1, 0] and not labels[:, [0, *range(2, 9)]].any()


def test_integer_translation_shifts_content_and_label():
    W = 8
    x = images(1, h=W, w=W)
    t = 1 / (0.125 * W)  # one pixel right and two pixels down
    out, labels = AugmentPipe(p=1, **{**OFF, "translate_frac": 1})(x, draws(u9=0.0, z2=t, z3=2 * t))
    torch.testing.assert_close(out[0, :, 2:, 1:], x[0, :, :-2, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, 0, 1:], x[0, :, 1, :-1], atol=1e-5, rtol=0)  # reflected border row
    torch.testing.assert_close(labels[0], torch.tensor([0, 0, 0, 0, 0, 0, 0, t, 2 * t]), atol=1e-7, rtol=0)


def test_quarter_rotation_is_exact_rot90_and_labelled():
    x = images(1, h=8, w=8)
    out, labels = AugmentPipe(p=1, **{**OFF, "rotate_frac": 1})(x, draws(u5=0.0, u6=0.75))  # angle = pi/2
    torch.testing.assert_close(labels[0, 3:5], torch.tensor([-1.0, 1.0]), atol=1e-7, rtol=0)
    assert not labels[0, [0, 1, 2, 5, 6, 7, 8]].any()
    # Content turns by +90 degrees in (x right, y down) coordinates, i.e. clockwise on screen.
    torch.testing.assert_close(out[0], torch.rot90(x[0], k=-1, dims=(1, 2)), atol=1e-5, rtol=0)


def test_scale_and_aniso_geometry_and_labels():
    n = 16
    x = torch.zeros(1, 1, n, n)
    x[0, 0, n // 2 - 1 : n // 2 + 1, n // 2 - 1 : n // 2 + 1] = 1  # centred 2x2 square
    w = 1 / 0.2  # zoom factor 2^(w * 0.2) = 2
    out, labels = AugmentPipe(p=1, **{**OFF, "scale": 1})(x, draws(u4=0.0, z0=w))
    assert labels[0, 2].item() == pytest.approx(w) and not labels[0, [0, 1, *range(3, 9)]].any()
    mass = out.sum().item()
    assert mass == pytest.approx(4 * 4, rel=1e-5)  # area grows by 2^2
    phi_u = 0.5  # phi = 0: stretch along x by 2, squeeze along y by 2
    out, labels = AugmentPipe(p=1, **{**OFF, "aniso": 1})(x, draws(u7=0.0, u8=phi_u, z1=w))
    torch.testing.assert_close(labels[0, 5:7], torch.tensor([w, 0.0]), atol=1e-6, rtol=0)
    cols = out[0, 0].sum(0) > 0.01
    rows = out[0, 0].sum(1) > 0.01
    assert cols.sum() > rows.sum()  # wider than tall


def test_only_transformed_samples_change():
    x = images(3)
    rng = draws(3, u4=[0.0, 0.9, 0.9], z0=[1.0, 1.0, 1.0])
    out, labels = AugmentPipe(p=0.5, **{**OFF, "scale": 1})(x, rng)
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1:], x[1:])
    assert labels[:, 2].tolist() == [1.0, 0.0, 0.0]


def test_edm_defaults_rates():
    pipe = AugmentPipe(p=0.12)  # xflip=1e8: the x-flip gate always opens, so half are mirrored
    n = 800
    _, labels = pipe(torch.zeros(n, 1, 4, 4), StackedRandomGenerator("cpu", range(n)))
    assert abs(labels[:, 0].mean().item() - 0.5) < 0.06
    for col in (1, 2, 4, 5, 7):  # y-flip is recorded only when it flips: 0.12 / 2
        rate = (labels[:, col] != 0).float().mean().item()
        expected = 0.06 if col == 1 else 0.12
        assert abs(rate - expected) < 0.04, (col, rate)
    assert torch.equal(labels[:, 7] != 0, labels[:, 8] != 0)  # both translation axes share one gate


def test_per_seed_determinism_independent_of_batch():
    pipe = AugmentPipe(p=0.5)
    x = images(8, c=1)
    seeds = [11, 3, 7, 100, 5, 42, 9, 0]
    full_out, full_lab = pipe(x, StackedRandomGenerator("cpu", seeds))
    parts = [(slice(0, 3), seeds[:3]), (slice(3, 8), seeds[3:])]
    for sl, s in parts:
        out, lab = pipe(x[sl], StackedRandomGenerator("cpu", s))
        torch.testing.assert_close(out, full_out[sl], atol=1e-6, rtol=0)
        assert torch.equal(lab, full_lab[sl])
    # Reversed order: each sample still gets its own seed's augmentation.
    out, lab = pipe(x.flip(0), StackedRandomGenerator("cpu", seeds[::-1]))
    torch.testing.assert_close(out, full_out.flip(0), atol=1e-6, rtol=0)
    assert torch.equal(lab, full_lab.flip(0))
    # Disabling a transform does not move the others' draws.
    _, lab_noscale = AugmentPipe(p=0.5, scale=0)(x, StackedRandomGenerator("cpu", seeds))
    assert torch.equal(lab_noscale[:, [0, 1, 3, 4, 5, 6, 7, 8]], full_lab[:, [0, 1, 3, 4, 5, 6, 7, 8]])
    assert not lab_noscale[:, 2].any()


def test_angle_range_respects_rotate_frac_max():
    pipe = AugmentPipe(p=1, **{**OFF, "rotate_frac": 1}, rotate_frac_max=0.25)
    _, lab = pipe(torch.zeros(200, 1, 4, 4), StackedRandomGenerator("cpu", range(200)))
    angles = torch.atan2(lab[:, 4], lab[:, 3] + 1)
    assert angles.abs().max() <= math.pi / 4 + 1e-6 and angles.abs().max() > math.pi / 8
