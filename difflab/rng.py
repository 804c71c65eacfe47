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


MAX_SEEDS = 10**7  # a larger --seeds list is a typo (0-99999999999), not a plan: it would not fit in memory


def parse_seeds(spec: str, flag: str = "--seeds") -> list[int]:
    """Parse ``"0-63,100"`` into ``[0, 1, ..., 63, 100]`` (EDM's seed syntax, ranges inclusive). Seeds are
    integers >= 0, each listed once, at most :data:`MAX_SEEDS` of them; anything else is one line."""
    from difflab.errors import UserError

    parts = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, sep, hi = part.partition("-")
            a, b = int(lo), int(hi) if sep else int(lo)
            if a < 0 or b < a:
                raise ValueError
        except ValueError:
            raise UserError(f"{flag} {spec}: cannot parse {part!r}; use seeds >= 0 like 0-63,100") from None
        parts.append((a, b))
    count = sum(b - a + 1 for a, b in parts)
    if count > MAX_SEEDS:
        raise UserError(f"{flag} {spec}: {count} seeds is more than {MAX_SEEDS}; split the run into smaller ranges")
    if not parts:
        raise UserError(f"{flag}: no seeds given; use a list like 0-63,100")
    seeds: list[int] = []
    for a, b in parts:
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        seen: set[int] = set()
        twice = next(s for s in seeds if s in seen or seen.add(s))
        raise UserError(f"{flag} {spec}: seed {twice} is listed twice; list each seed once")
    return seeds
