"""difflab: train, sample and evaluate diffusion models in one framework (see README.md).

Python API: :func:`train`, :class:`Trainer`, :func:`load` (-> :class:`Pipeline`), :func:`fit_grid`, :func:`save_grid`,
:func:`report`. Bad input raises :class:`difflab.errors.UserError`, whose message is the one line the CLI prints.
"""

__version__ = "0.1.0"

from difflab._compat import alias_submodules  # noqa: E402
from difflab.api import Pipeline, Trainer, fit_grid, load, make_config, save_grid, train  # noqa: E402
from difflab.reporting import report  # noqa: E402  (module named reporting: difflab.report stays the function)

# The commands moved into difflab/cli/ (one module per command); the old module names still import.
alias_submodules(__name__, {"generate_cli": "difflab.cli.generate", "info_cli": "difflab.cli.info",
                            "nll_cli": "difflab.cli.nll"})

__all__ = ["Pipeline", "Trainer", "fit_grid", "load", "make_config", "report", "save_grid", "train", "__version__"]
