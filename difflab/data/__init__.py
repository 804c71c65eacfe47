"""Data layer (docs/data.md): datasets yield ``(uint8 [C,H,W] image, label, index)``.

Sources: image folders and zips (+ dataset.json), NPY/NPZ images, volumes and stacks, the built-in
``digits``, MNIST IDX files and the CIFAR-10 python tarball. Also the EDM-style dataset tool and
the non-leaky augmentation pipe.
"""

from difflab._compat import alias_submodules
from difflab.data.augment import AUGMENT_DIM, AugmentPipe, augment_dim
from difflab.data.datasets import ImageDataset, check_resolution, open_dataset, open_source, parse_resolution

__all__ = [
    "AUGMENT_DIM",
    "AugmentPipe",
    "ImageDataset",
    "augment_dim",
    "check_resolution",
    "open_dataset",
    "open_source",
    "parse_resolution",
]

alias_submodules(__name__, {"cli": "difflab.cli.dataset"})  # the command moved to difflab/cli/
