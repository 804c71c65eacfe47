"""difflab: train, sample and evaluate diffusion models in one framework (see README.md).

Python API: :func:`train`, :class:`Trainer`, :func:`load` (-> :class:`Pipeline`), :func:`save_grid`.
"""

__version__ = "0.1.0"

from difflab.api import Pipeline, Trainer, load, make_config, save_grid, train  # noqa: E402

__all__ = ["Pipeline", "Trainer", "load", "make_config", "save_grid", "train", "__version__"]
