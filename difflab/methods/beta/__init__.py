"""Beta diffusion and Smoothed Dirichlet Diffusion (specs/beta_sdd.md).

``process``: schedule, exact log-space Gamma draws, logit-space reverse update, standardisation.
``divergences``: KL between Betas via Gamma KLs, Hölder pseudo-divergence, SDD penalty integral.
``losses``: the per-element objectives. ``method``: :class:`BetaMethod` (both variants, sampler).
"""

from difflab.methods.beta.method import BetaMethod

__all__ = ["BetaMethod"]
