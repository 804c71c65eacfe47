"""Evaluation: the TF-FID Inception detector, FID/KID/precision-recall/IS, PSNR/SSIM and LPIPS.

Modules: ``inception`` (detector file lookup, resize recipes, features), ``fid`` (statistics and
metrics), ``sources`` (datasets, subsets, shards, feature cache), ``evaluate`` (library entry points
behind ``difflab fid``), ``image_metrics`` (PSNR, SSIM), ``lpips``, ``standin`` (a fast test
detector) and ``cli``. See docs/evaluation.md.
"""
