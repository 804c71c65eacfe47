"""Deprecated: the old home of the training loop. ``difflab.train`` is the training *function*
(:func:`difflab.api.train`); the loop lives in :mod:`difflab.training`, checkpoints in :mod:`difflab.runio`,
process groups in :mod:`difflab.distributed` and the command in :mod:`difflab.cli.train`.

The old submodule paths (``difflab.train.loop`` ...) still import, with a DeprecationWarning. Importing one
makes Python bind this package to the name ``difflab.train``; the package is therefore callable and forwards
to :func:`difflab.api.train`, so ``difflab.train("digits-quick", ...)`` works whatever was imported before.
"""

import sys
import types

from difflab._compat import alias_submodules

alias_submodules(__name__, {
    "loop": "difflab.training.loop",
    "ema": "difflab.training.ema",
    "logging": "difflab.training.logging",
    "checkpoint": "difflab.runio.checkpoints",
    "distributed": "difflab.distributed",
    "cli": "difflab.cli.train",
})


class _TrainModule(types.ModuleType):
    """This package, callable as :func:`difflab.api.train`."""

    def __call__(self, *args, **kwargs):
        from difflab.api import train

        return train(*args, **kwargs)

    @property
    def __wrapped__(self):  # inspect.signature(difflab.train) shows the function's signature
        from difflab.api import train

        return train


sys.modules[__name__].__class__ = _TrainModule
