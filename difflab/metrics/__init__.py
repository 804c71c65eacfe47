"""Evaluation: the TF-FID Inception detector, FID/KID/precision-recall/IS, PSNR/SSIM and LPIPS.

Modules: ``inception`` (detector file lookup, resize recipes, features), ``fid`` (statistics and
metrics), ``sources`` (datasets, subsets, shards, feature cache), ``evaluate`` (library entry points
behind ``difflab fid``), ``image_metrics`` (PSNR, SSIM) and ``standin`` (a fast test
detector); LPIPS is :mod:`difflab.nets.lpips` (a loss too); the command is :mod:`difflab.cli.fid`.
See docs/evaluation.md.
"""

from difflab._compat import alias_submodules

alias_submodules(__name__, {"cli": "difflab.cli.fid", "lpips": "difflab.nets.lpips"})
