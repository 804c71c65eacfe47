"""Per-sample random streams: every draw for sample k comes from a generator seeded by seed k.

This is what makes an image depend on its seed alone (DESIGN.md "Seeds"), independent of batch size,
rank count and order. Training uses the same mechanism with seeds derived from (run seed, step,
global sample index), so two ranks at global batch B draw exactly the noise one rank would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StackedRandomGenerator:
    """A batch of independent ``torch.Generator`` s, one per sample, stacked along dim 0."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        # CUDA/MPS generators are device-specific; draws on CPU then moved keep results device-independent.
        self.gen_device = torch.device("cpu")
        self.generators = [torch.Generator(self.gen_device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, fn, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        size = tuple(size)
        if size[0] != len(self.generators):
            raise ValueError(f"first dimension {size[0]} != number of seeds {len(self.generators)}")
        out = torch.stack([fn(size[1:], g) for g in self.generators])
        return out.to(device=self.device, dtype=dtype)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._stack(lambda s, g: torch.randn(s, generator=g, dtype=torch.float64), size, dtype)

    def rand(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._stack(lambda s, g: torch.rand(s, generator=g, dtype=torch.float64), size, dtype)

    def randint(self, high: int, size: Sequence[int]) -> torch.Tensor:
        return self._stack(lambda s, g: torch.randint(high, s, generator=g), size, torch.int64)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.dtype)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.rand(x.shape, x.dtype)


def parse_seeds(spec: str) -> list[int]:
    """Parse ``"0-63,100"`` into ``[0, 1, ..., 63, 100]`` (EDM's seed syntax, ranges inclusive)."""
    from difflab.errors import UserError

    seeds: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds: cannot parse {part!r}; use a list like 0-63,100") from None
    if not seeds:
        raise UserError("--seeds: no seeds given; use a list like 0-63,100")
    return seeds
