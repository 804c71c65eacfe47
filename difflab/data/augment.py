"""Non-leaky geometric augmentation, EDM style (specs/gaussian_and_dddm.md §5.6).

Each transform fires for a sample when a uniform draw is below ``multiplier * p``; what it did is
recorded in a 9-D augmentation label that the network receives (``augment_labels``), so the model
learns the augmented distribution *conditioned on* the label and, sampled with no label (zeros),
produces un-augmented images. Label layout (always 9 columns, zeros for a transform that did not
fire or is disabled):

    0  x-flip bit                         (1 = mirrored left-right)
    1  y-flip bit                         (1 = mirrored top-bottom)
    2  isotropic scale draw w             (zoom factor 2^(w * scale_std))
    3  cos(angle) - 1                     (rotation by ``angle``)
    4  sin(angle)
    5  w_a * cos(phi)                     (anisotropic stretch 2^(w_a * aniso_std) along angle phi)
    6  w_a * sin(phi)
    7  t_x draw                           (shift by t_x * translate_std * W pixels)
    8  t_y draw                           (shift by t_y * translate_std * H pixels)

With EDM's training defaults (``p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
translate_frac=1``) the x-flip gate always opens (1e8 * p >= 1) so half the images are mirrored, and
each other transform fires with probability 0.12. With ``p=0`` every gate stays shut, including
x-flip, and the pipe is the identity with all-zero labels.

Every random number of sample ``k`` comes from row ``k`` of the :class:`StackedRandomGenerator`, and
each sample always draws the same fixed set of numbers, so its augmentation depends on its seed
alone (not on the batch it sits in, nor on which transforms are enabled).

Difference from EDM: EDM resamples through a 2x-upsampled, wavelet-filtered, mirror-padded image;
we use one bilinear ``grid_sample`` with reflection padding, which is slightly blurrier under
rotation/scale but has the same geometry and the same label semantics. Integer transforms (flips)
are exact pixel permutations, and samples with no geometric transform are passed through untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difflab.rng import StackedRandomGenerator

AUGMENT_DIM = 9
augment_dim = AUGMENT_DIM  # the network's augment_dim (EDM's name)

# Uniform and normal draws per sample (fixed counts; see module docstring).
_N_UNIFORM = 10
_N_NORMAL = 4


class AugmentPipe:
    """EDM's AugmentPipe restricted to the 9-D geometric set used for CIFAR-10 training (§5.6)."""

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 1e8,
        yflip: float = 1,
        scale: float = 1,
        rotate_frac: float = 1,
        aniso: float = 1,
        translate_frac: float = 1,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        translate_frac_std: float = 0.125,
    ):
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.translate_frac_std = float(translate_frac_std)

    def config(self) -> dict:
        """Constructor kwargs, for training_options.json."""
        return dict(self.__dict__)

    def __call__(self, images: torch.Tensor, rng: StackedRandomGenerator) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` float ``[N,C,H,W]`` -> ``(augmented [N,C,H,W], augment_labels [N,9])``."""
        N, C, H, W = images.shape
        device = images.device
        u = rng.rand([N, _N_UNIFORM], dtype=torch.float64).to(device)
        z = rng.randn([N, _N_NORMAL], dtype=torch.float64).to(device)
        zero = torch.zeros(N, dtype=torch.float64, device=device)

        def gate(column: int, multiplier: float) -> torch.Tensor:
            return u[:, column] < multiplier * self.p

        # Pixel flips (exact).
        fx = torch.where(gate(0, self.xflip), (u[:, 1] < 0.5).double(), zero)
        fy = torch.where(gate(2, self.yflip), (u[:, 3] < 0.5).double(), zero)
        out = images
        if bool(fx.any()):
            out = torch.where(fx.view(N, 1, 1, 1).bool(), out.flip(3), out)
        if bool(fy.any()):
            out = torch.where(fy.view(N, 1, 1, 1).bool(), out.flip(2), out)

        # Geometric parameters (zero = did not fire).
        w_s = torch.where(gate(4, self.scale), z[:, 0], zero)
        angle = torch.where(gate(5, self.rotate_frac), (u[:, 6] * 2 - 1) * math.pi * self.rotate_frac_max, zero)
        w_a = torch.where(gate(7, self.aniso), z[:, 1], zero)
        phi = (u[:, 8] * 2 - 1) * math.pi
        t_on = gate(9, self.translate_frac)
        t_x = torch.where(t_on, z[:, 2], zero)
        t_y = torch.where(t_on, z[:, 3], zero)

        labels = torch.stack(
            [fx, fy, w_s, angle.cos() - 1, angle.sin(), w_a * phi.cos(), w_a * phi.sin(), t_x, t_y], dim=1
        )

        moved = (w_s != 0) | (angle != 0) | (w_a != 0) | (t_x != 0) | (t_y != 0)
        if bool(moved.any()):
            idx = moved.nonzero().squeeze(1)
            theta = self._inverse_affine(w_s[idx], angle[idx], w_a[idx], phi[idx], t_x[idx], t_y[idx], H, W)
            sub = out[idx]
            grid = F.affine_grid(theta.to(sub.dtype), list(sub.shape), align_corners=False)
            warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            out = out.index_copy(0, idx, warped)
        return out, labels.to(torch.float32)

    def _inverse_affine(self, w_s, angle, w_a, phi, t_x, t_y, H: int, W: int) -> torch.Tensor:
        """``[n,2,3]`` map from output to input positions in ``affine_grid``'s normalised coordinates.

        Built in centred pixel units, where the forward transform of the content is
        ``x -> T R A S x`` (scale, stretch, rotate, then shift), and inverted term by term."""
        n = w_s.shape[0]
        dev = w_s.device

        def rot(a):
            c, s = a.cos(), a.sin()
            m = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = c, -s, s, c, 1
            return m

        def diag(sx, sy):
            m = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
            m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
            return m

        s = torch.exp2(w_s * self.scale_std)
        a = torch.exp2(w_a * self.aniso_std)
        shift = torch.eye(3, dtype=torch.float64, device=dev).repeat(n, 1, 1)
        shift[:, 0, 2] = -t_x * self.translate_frac_std * W
        shift[:, 1, 2] = -t_y * self.translate_frac_std * H
        # Inverse of T R A S = S^-1 A^-1 R^-1 T^-1 with A = R(phi) diag(a, 1/a) R(-phi).
        inv = diag(1 / s, 1 / s) @ rot(phi) @ diag(1 / a, a) @ rot(-phi) @ rot(-angle) @ shift
        to_pix = diag(
            torch.full((n,), W / 2.0, dtype=torch.float64, device=dev),
            torch.full((n,), H / 2.0, dtype=torch.float64, device=dev),
        )
        to_norm = diag(
            torch.full((n,), 2.0 / W, dtype=torch.float64, device=dev),
            torch.full((n,), 2.0 / H, dtype=torch.float64, device=dev),
        )
        return (to_norm @ inv @ to_pix)[:, :2, :]
