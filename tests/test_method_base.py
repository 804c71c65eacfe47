"""The Method contract of difflab.methods.base: the default batch_loss hands every field of the Batch to
loss(), and Batch.record checks its rows."""

from __future__ import annotations

import pytest
import torch

from difflab.methods.base import Batch, Method
from difflab.rng import StackedRandomGenerator


class Probe(Method):
    def loss(self, x0, class_labels, rng, augment_labels=None):
        self.got = (x0, class_labels, rng, augment_labels)
        return x0.flatten(1).sum(1)


def test_default_batch_loss_passes_every_field_to_loss():
    m = Probe(torch.nn.Identity(), img_channels=1, img_resolution=2, label_dim=3)
    x0, labels, aug = torch.randn(2, 1, 2, 2), torch.eye(3)[:2], torch.randn(2, 9)
    rng = StackedRandomGenerator("cpu", [0, 1])
    out = m(Batch(x0, labels, rng, aug, index=torch.tensor([4, 5])))
    assert m.got[0] is x0 and m.got[1] is labels and m.got[2] is rng and m.got[3] is aug
    torch.testing.assert_close(out, x0.flatten(1).sum(1))


def test_record_keeps_detached_rows_and_refuses_a_wrong_count():
    b = Batch(torch.zeros(3, 1, 2, 2))
    v = torch.ones(3, 2, requires_grad=True)
    b.record("bank", value=v)
    assert not b.updates["bank"]["value"].requires_grad and torch.equal(b.updates["bank"]["value"], v.detach())
    with pytest.raises(ValueError, match=r"^record\('bank'\): value has 2 rows, the batch has 3$"):
        b.record("bank", value=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"^record\('bank'\): value has no rows, the batch has 3$"):
        b.record("bank", value=torch.tensor(1.0))
