"""difflab: train, sample and evaluate diffusion models in one framework (see README.md)."""

__version__ = "0.1.0"
