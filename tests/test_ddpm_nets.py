"""The DDPM U-Net and UNetMini (specs/gaussian_and_dddm.md §2.4; DESIGN.md network signature)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.nets import build_network
from difflab.nets.ddpm_unet import AttnBlock, DDPMUNet, one_hot_labels
from difflab.nets.unetmini import UNetMini


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _perturb_output(net: nn.Module) -> nn.Module:
    """Residual-branch and output convs start at zero (Ho et al.); give them weights so the output
    depends on every input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def test_ddpm_unet_cifar10_size():
    """Ho et al.'s CIFAR-10 network: ch 128, mult (1,2,2,2), 2 blocks, attention at 16, ≈ 35.7M params."""
    net = build_network("ddpm_unet")
    assert 35.6e6 < n_params(net) < 35.8e6
    attn = [m for m in net.modules() if isinstance(m, AttnBlock)]
    assert len(attn) == 2 + 3 + 1  # 16x16 level: 2 down + 3 up blocks; plus the middle block


@pytest.mark.parametrize("res", [16, 28, 32])
def test_unetmini_shapes_and_no_attention(res):
    net = _perturb_output(UNetMini(res, 1, 2, model_channels=8, channel_mult=(1, 2, 2), num_groups=4))
    assert not any(isinstance(m, AttnBlock) for m in net.modules())
    out = net(torch.randn(3, 1, res, res), torch.tensor([0.0, 10.0, 999.0]))
    assert out.shape == (3, 2, res, res)


@pytest.mark.parametrize("attn", [(7,), (14,), (28, 4)])
def test_configurable_ddpm_unet_odd_sizes(attn):
    """28 -> 14 -> 7 -> 4: attention sits at exactly the requested sizes on BOTH sides (review defect 3: the
    decoder used to double from 4 to 8, 16, 32, so attention at 7 or 14 appeared in the encoder only)."""
    net = _perturb_output(DDPMUNet(28, 3, 3, model_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                                   attn_resolutions=attn, dropout=0.0, num_groups=8, num_heads=2))
    seen = {}
    for side in ("down", "mid", "up"):
        for m in getattr(net, side).modules():
            if isinstance(m, AttnBlock):
                m.register_forward_hook(lambda mod, inp, out, side=side: seen.setdefault(side, []).append(
                    inp[0].shape[-1]))
    assert net(torch.randn(2, 3, 28, 28), torch.tensor(5.0)).shape == (2, 3, 28, 28)
    assert seen["mid"] == [4]
    # per requested size: num_res_blocks (1) encoder blocks and num_res_blocks + 1 (2) decoder blocks
    assert sorted(seen.get("down", [])) == sorted(attn)
    assert sorted(seen.get("up", [])) == sorted(r for r in attn for _ in range(2))


def test_time_and_labels_condition_the_output():
    net = _perturb_output(UNetMini(8, 1, 1, label_dim=4, model_channels=8, channel_mult=(1, 2),
                                   num_res_blocks=1, num_groups=4, label_dropout=0.5))
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3.0, 3.0])
    base = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(base, net(x, torch.tensor([300.0, 300.0]), torch.tensor([1, 1])))
    assert not torch.allclose(base, net(x, t, torch.tensor([2, 2])))
    # null label = zero one-hot = no label embedding at all
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None))
    assert bool((one_hot_labels(torch.tensor([-1, 2]), 4, torch.float32) == torch.tensor(
        [[0.0, 0, 0, 0], [0, 0, 1, 0]])).all())
    # label dropout acts only in training (global torch RNG); with p=1 every label becomes null
    net.label_dropout = 1.0
    torch.testing.assert_close(net(x, t, torch.tensor([1, 1])), base)
    net.train()
    torch.testing.assert_close(net(x, t, torch.tensor([1, 1])), net(x, t, None))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, torch.tensor([4, 0]))


def test_augment_labels_and_context_signature():
    net = _perturb_output(UNetMini(8, 1, 1, augment_dim=3, model_channels=8, channel_mult=(1, 2),
                                   num_res_blocks=1, num_groups=4))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([7.0])
    plain = net(x, t)
    assert not torch.allclose(plain, net(x, t, augment_labels=torch.ones(1, 3)))
    torch.testing.assert_close(net(x, t, None, None, context=torch.ones(1, 5)), plain)


def test_registry_entries():
    net = build_network("unetmini", img_resolution=16, label_dim=10, model_channels=16, channel_mult=[1, 2])
    assert isinstance(net, UNetMini) and net.label_dim == 10
    with pytest.raises(UserError, match="attn_resolutions"):
        build_network("unetmini", attn_resolutions=[16])
