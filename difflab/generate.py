"""Generation from a run: per-seed noise, batching across ranks, PNG/NPZ output and montages
(DESIGN.md "Seeds", "Run directory"; EDM's generate.py conventions, specs/gaussian_and_dddm.md §5.7).

An image depends on its seed alone: every draw comes from the seed's own generator, and the backbone
runs in fixed chunks of ``net_batch`` rows (:meth:`Method.batch_invariant`), so ``--batch`` and the
number of ranks never change a pixel.
"""

from __future__ import annotations

import inspect
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import distributed as dist
from difflab import runio as ck
from difflab.build import load_run, named_parameters, output_resolution
from difflab.data.images import crop_square
from difflab.data.sources import GENERATE_GRID, GENERATE_MANIFEST
from difflab.errors import UserError, echo
from difflab.methods.base import Method
from difflab.methods.beta.method import GRIDS as BETA_GRIDS
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.base import GRIDS as GAUSSIAN_GRIDS
from difflab.methods.gaussian.base import GaussianMethod
from difflab.options import check_value, coerce, opt, specs
from difflab.rng import MAX_SEEDS, StackedRandomGenerator, parse_seeds
from difflab.runio import atomic_write_bytes, check_folder_arg, npz_bytes
from difflab.utils import fp32_precision, make_grid, resolve_device, save_png

NET_BATCH = 16


# ---- sampler options: the one schema of generate's flags, -o KEY=VALUE and Pipeline.sample keywords --------

SOLVERS = {"ablation": ("euler", "heun"), "ode": S.ODE_SOLVERS}
ABLATION_CHOICES = {"discretization": ("vp", "ve", "iddpm", "edm"), "schedule": ("vp", "ve", "linear"),
                    "scaling": ("vp", "none")}  # sample_ablation's own lists (§5.4)


def _s(help: str = "", **kw) -> Any:
    return field(default=None, metadata=opt(help, **kw))


@dataclass
class SamplerOptions:
    """Sampler settings (every one defaults to the run's ``sampler`` section); which sampler takes which
    option is :data:`difflab.methods.gaussian.samplers.SAMPLER_OPTIONS`."""

    FLAG_STYLE = "_"  # --sigma_max, --S_churn as EDM and score SDE spell them (--sigma-max works too)

    sampler: str | None = _s("any Gaussian run: heun | euler | ablation | ancestral | deterministic | ddim | pc | "
                             "ode | dpmpp_2m | dpmpp_3m | dpmpp_2s | dpmpp_sde | unipc | euler_ancestral | ipndm | "
                             "deis | adaptive (dashes work too: dpmpp-2m); SDD/Beta runs: sdd; DDDM runs: dddm "
                             "(docs/samplers.md)")
    steps: int | None = _s("sampler steps (pc/ode: discretisation levels N; dddm: fixed-point steps K = NFE)",
                           flags=("--steps", "--sample-steps"), min=1)
    guidance: float | None = _s("classifier-free guidance scale (class-conditional runs)", min=0)
    grid: str | None = _s("sigma grid of every sigma-grid sampler: karras | logsnr (= exponential) | time-uniform | "
                          "table (a DDPM run's own spacing); SDD/Beta: auto | alpha | t",
                          choices=(*GAUSSIAN_GRIDS, *BETA_GRIDS))
    S_churn: float | None = _s("stochasticity (EDM Alg. 2)", min=0)
    S_min: float | None = _s(min=0)
    S_max: float | None = _s(min=0)
    S_noise: float | None = _s(min=0)
    sigma_min: float | None = _s(gt=0)
    sigma_max: float | None = _s(gt=0)
    rho: float | None = _s("Karras grid exponent", gt=0)
    eta: float | None = _s("ddim: 0 deterministic, 1 DDPM-like", min=0)
    alpha: float | None = _s("ablation: the second-order step's position", gt=0, max=1)
    epsilon_s: float | None = _s(gt=0, lt=1)
    snr: float | None = _s("pc: Langevin signal-to-noise ratio", gt=0)
    rtol: float | None = _s("ode: relative tolerance", gt=0)
    atol: float | None = _s("ode: absolute tolerance", gt=0)
    t_eps: float | None = _s("pc/ode: end time", gt=0, lt=1)
    solver: str | None = _s("ablation: euler | heun; ode: " + " | ".join(S.ODE_SOLVERS),
                            choices=tuple(dict.fromkeys(SOLVERS["ablation"] + SOLVERS["ode"])))
    discretization: str | None = _s(flags=("--discretization", "--disc"), choices=ABLATION_CHOICES["discretization"])
    schedule: str | None = _s(choices=ABLATION_CHOICES["schedule"])
    scaling: str | None = _s(choices=ABLATION_CHOICES["scaling"])
    skip: str | None = _s("ddim on a DDPM table: uniform | quad")
    respacing: str | None = _s("ancestral/deterministic on a DDPM table: N, a,b,c or ddimN")
    var_type: str | None = _s(choices=S.VAR_TYPES)
    predictor: str | None = _s(choices=S.PREDICTORS)
    corrector: str | None = _s(choices=S.CORRECTORS)
    corrector_steps: int | None = _s("pc: Langevin steps per level", flags=("--corrector-steps",), min=0)
    order: str | None = _s("pc: corrector-first | predictor-first; unipc (1-3), ipndm (1-4), deis (1-4): the "
                           "solver's order")
    variant: str | None = _s("unipc: bh1 | bh2 (B(h) = h or e^h - 1)", choices=("bh1", "bh2"))
    lower_order_final: bool | None = _s("dpmpp_3m/unipc: lower-order last steps", metavar="BOOL")
    use_corrector: bool | None = _s("unipc: the UniC corrector", metavar="BOOL")
    norm: str | None = _s(choices=S.NORMS)
    noise_removal: bool | None = _s("pc: end on the last predictor's mean", metavar="BOOL")
    denoise_final: bool | None = _s("ode: a last denoising step", metavar="BOOL")
    C_1: float | None = _s(gt=0)
    C_2: float | None = _s(gt=0)
    M: int | None = _s(min=1)
    prior: str | None = _s("SDD/Beta: mean | constant")


def sampler_kwargs(model: Method, stored: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's stored sampler settings with the user's (checked) ``overrides`` on top. When the overrides pick
    another sampler of a Gaussian run, the stored settings that belong to the run's own sampler (its step count,
    a predictor-corrector's predictor, ...) are left out: only what the new sampler takes carries over."""
    new = overrides.get("sampler")
    if not isinstance(model, GaussianMethod):
        return {**stored, **overrides}
    if new in (None, stored.get("sampler")):
        kw = {**stored, **overrides}
    else:
        keep = S.allowed_options(str(new).replace("-", "_")) | {"guidance", "clip_denoised"}
        kw = {**{k: v for k, v in stored.items() if k in keep and k != "steps"}, **overrides}
    if kw.get("grid") == "fitted" and kw.get("sigmas") is None:  # the levels themselves, for generate.json
        kw["sigmas"] = model.fitted_sigmas(*model.resolve_steps(kw.get("sampler"), kw.get("steps")))
    return kw


def check_sampler_options(model: Method, defaults: dict[str, Any], overrides: dict[str, Any],
                          flags: dict[str, str] | None = None) -> dict[str, Any]:
    """The user's sampler ``overrides`` typed and checked against the schema, the chosen sampler and the model,
    before anything is generated or written; returns them typed. ``flags`` maps a key to the way the user
    spelled it (``-o steps=x``) for the message."""
    table = specs(SamplerOptions)
    own = named_parameters(type(model).sample) - {"self", "rng", "class_labels", "info"}
    known = set(table) | own | set(defaults) | set(S.GRID_OPTIONS) | {k for opts in S.SAMPLER_OPTIONS.values()
                                                                       for k in opts}
    out = {}
    for key, value in overrides.items():
        shown = (flags or {}).get(key)
        if key not in known:
            raise UserError(f"{shown or key}: unknown sampler option {key!r}; known: {', '.join(sorted(table))}")
        out[key] = coerce(table[key], value, shown) if key in table else value
    sampler = out.get("sampler") or defaults.get("sampler") or model.default_sampler
    if isinstance(model, GaussianMethod):
        S.check_options(sampler, {k: v for k, v in out.items() if k not in ("sampler", "steps", "guidance")
                                  and k in table})
        if out.get("solver") is not None and sampler in SOLVERS and out["solver"] not in SOLVERS[sampler]:
            raise UserError(f"--solver {out['solver']}: --sampler {sampler} takes one of {', '.join(SOLVERS[sampler])}")
    else:
        if sampler not in model.samplers:
            raise UserError(f"--sampler {sampler}: a {model.name} run samples with {', '.join(model.samplers)}")
        takes = (own | set(defaults)) - {"class_labels"}
        unused = sorted(k for k in out if k not in takes)
        if unused:  # an EDM-family option (--solver, --discretization, ...) would be ignored silently
            raise UserError(f"{(flags or {}).get(unused[0]) or unused[0]}: a {model.name} run's sampler has no "
                            f"option {unused[0]!r}; it takes {', '.join(sorted(takes))}")
    if out.get("sigmas") is not None and isinstance(model, GaussianMethod):
        n = len(model.explicit_grid(out["sigmas"])) - 1
        if out.get("steps") not in (None, n):
            raise UserError(f"--steps {out['steps']}: -o sigmas gives {n} levels, which set the steps; drop --steps")
    lo, hi = out.get("sigma_min"), out.get("sigma_max")
    if lo is not None and hi is not None and not lo < hi:
        raise UserError(f"--sigma_min {lo} --sigma_max {hi}: need sigma_min < sigma_max")
    if out.get("guidance") not in (None, 1.0) and model.label_dim == 0:
        raise UserError(f"--guidance {out['guidance']}: this model is unconditional (no class labels to guide "
                        "with); drop --guidance")
    return out


def check_class(model: Method, class_idx: int | None) -> None:
    if class_idx is not None:
        if model.label_dim == 0:
            raise UserError("--class: this model is unconditional; drop --class")
        if isinstance(class_idx, bool) or not isinstance(class_idx, int) or not 0 <= class_idx < model.label_dim:
            raise UserError(f"--class {class_idx}: must be an integer in 0..{model.label_dim - 1}")


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as a list of distinct integers >= 0 (:func:`difflab.rng.parse_seeds` makes one from ``0-63,100``)."""
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise UserError("--seeds: give integers >= 0 (e.g. range(64) or '0-63,100')") from None
    if not out or min(out) < 0 or len(set(out)) != len(out) or len(out) > MAX_SEEDS:
        raise UserError(f"--seeds: need 1 to {MAX_SEEDS} distinct integers >= 0, got {len(out)} "
                        f"({len(out) - len(set(out))} repeated)")
    return out


def rank_batches(seeds: Sequence[int], batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Split seeds into batches of at most ``batch`` and deal them to ranks round-robin."""
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    seeds = list(seeds)
    num = max((len(seeds) + batch * world - 1) // (batch * world) * world, 1)
    chunks = np.array_split(np.asarray(seeds, dtype=np.int64), num)
    return [c.tolist() for c in chunks[rank::world] if len(c)]


def compile_backbone(model: Method) -> Method:
    """``torch.compile`` the backbone in place for sampling (opt-in: ``generate --compile``, ``fid calc
    --compile``). The net is called on fixed ``net_batch``-row chunks (:meth:`Method.batch_invariant`), so one
    static-shape graph serves every batch and images stay independent of ``--batch``; compiled kernels round
    differently from eager ones, so pixels may differ from an eager run by one level (docs/performance.md)."""
    model.net.compile(dynamic=False)
    return model


def generate_batches(model: Method, seeds: Sequence[int], batch: int = 64, sampler_kwargs: dict | None = None,
                     device: str | torch.device | None = None, rank: int = 0, world: int = 1,
                     class_idx: int | None = None, net_batch: int = NET_BATCH, progress: bool = True,
                     tf32: bool = False, info: dict | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(seeds, uint8 images [n,C,H,W])`` for this rank's share of ``seeds`` (TF32 off unless ``tf32``).
    ``info["nfe"]`` collects the network evaluations per image that adaptive samplers report."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    kw = dict(sampler_kwargs or {})
    check_class(model, class_idx)
    mine = rank_batches(seeds, batch, rank, world)
    bar = dist.progress(sum(len(b) for b in mine), "generate", enabled=progress and rank == 0)
    was_training = model.training
    model.eval()
    try:
        for batch_seeds in mine:
            rng = StackedRandomGenerator(dev, batch_seeds)
            labels = None if class_idx is None else torch.full((len(batch_seeds),), class_idx, device=dev)
            extra = {"info": {}} if info is not None and "info" in inspect.signature(model.sample).parameters else {}
            with torch.no_grad(), model.batch_invariant(net_batch), fp32_precision(tf32):
                x = model.sample(rng, class_labels=labels, **kw, **extra)
            if extra.get("info", {}).get("nfe") is not None:
                info.setdefault("nfe", []).append(extra["info"]["nfe"])
            bar.update(len(batch_seeds))
            images = model.decode(x).cpu()
            if getattr(model, "crop_to", None):  # a --pad-to run: back to the data's own size
                images = crop_square(images, model.crop_to).contiguous()
            yield batch_seeds, images
    finally:
        model.train(was_training)
        bar.close()


MANIFEST = GENERATE_MANIFEST  # the settings the images in an outdir were made with
GRID = GENERATE_GRID  # the data layer leaves it out of the image set when MANIFEST is beside it
NPZ = "images.npz"
NPZ_PARTS = ".images.npz.parts"  # finished batches of an --npz run that has not completed yet


def seed_path(outdir: Path, seed: int, subdirs: bool) -> Path:
    folder = outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir
    return folder / f"{seed:06d}.png"


def png_is_complete(path: Path, shape: tuple[int, int, int]) -> bool:
    """The PNG exists, its chunks pass PIL's CRC check and it is ``shape`` = (C, H, W) in uint8 L/RGB."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            c, h, w = shape
            return img.size == (w, h) and img.mode == ("L" if c == 1 else "RGB")
    except (OSError, SyntaxError, ValueError):
        return False


def _settings(network: str | Path, sampler_kwargs: dict, class_idx: int | None, net_batch: int,
              compile: bool = False) -> dict:
    """Everything that decides the pixels of a seed's image (the device aside), JSON-ready. ``compile`` is
    recorded only when on (compiled kernels round differently), so eager manifests keep their old form."""
    import hashlib
    import json

    json_path = ck.resolve_checkpoint(network)
    settings = {"format": "difflab-generate-1", "checkpoint": str(json_path.resolve()),
                "checkpoint_sha256": hashlib.sha256(json_path.read_bytes()).hexdigest(),
                "sampler": sampler_kwargs, "class": class_idx, "net_batch": net_batch}
    if compile:
        settings["compile"] = True
    return json.loads(json.dumps(settings))


def _manifest_conflict(outdir: Path, settings: dict) -> str | None:
    """The first setting in which ``outdir``'s manifest differs from ``settings`` (None: same or absent)."""
    import json

    try:
        old = json.loads((outdir / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for key in ("checkpoint_sha256", "sampler", "class", "net_batch", "compile"):
        a, b = old.get(key), settings.get(key)
        if a == b:
            continue
        if key == "checkpoint_sha256":
            return "another checkpoint"
        if key == "compile":
            return f"--compile {'on' if a else 'off'}, now {'on' if b else 'off'}"
        if key == "sampler" and isinstance(a, dict):
            k = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            return f"{k} {a.get(k)!r}, now {b.get(k)!r}"
        return f"{key} {a!r}, now {b!r}"
    return None


def _stored_npz(outdir: Path, shape: tuple[int, int, int]) -> dict[int, np.ndarray]:
    """seed -> HWC image from a previous ``images.npz`` and the finished parts of a killed ``--npz`` run.
    A damaged part is deleted with a warning (its seeds are generated again)."""
    from difflab.errors import warn

    c, h, w = shape
    found: dict[int, np.ndarray] = {}
    files = ([outdir / NPZ] if (outdir / NPZ).is_file() else []) + sorted((outdir / NPZ_PARTS).glob("*.npz"))
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as z:
                images, seeds = z["images"], z["seeds"]
            ok = images.dtype == np.uint8 and images.shape[1:] == (h, w, c) and seeds.shape == images.shape[:1]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            ok = False
        if not ok:
            warn(f"{path} is damaged or of another shape; generating its seeds again")
            if path.parent.name == NPZ_PARTS:
                path.unlink(missing_ok=True)
            continue
        found.update(zip(seeds.tolist(), images))
    return found


def _npz_seeds(path: Path) -> list[int] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["seeds"].tolist()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _plan(outdir: Path, seeds: list[int], settings: dict, shape: tuple[int, int, int], subdirs: bool, npz: bool,
          overwrite: bool) -> list[int]:
    """Rank 0, before anything is generated: clear stale temp files, check the manifest, write it and
    return the seeds whose output is missing or damaged (all of them with ``overwrite``)."""
    import json
    import shutil

    from difflab.errors import warn
    from difflab.runio import atomic_write_text, remove_stale_temps

    for folder in [outdir, *(p for p in outdir.iterdir() if p.is_dir())]:
        for name in ("*.png", "*.npz", MANIFEST):
            remove_stale_temps(folder, name)
    if overwrite:
        shutil.rmtree(outdir / NPZ_PARTS, ignore_errors=True)
        todo = list(seeds)
    elif npz:
        done = _stored_npz(outdir, shape)
        todo = [s for s in seeds if s not in done]
    else:
        todo = [s for s in seeds if not png_is_complete(seed_path(outdir, s, subdirs), shape)]
    kept = len(seeds) - len(todo)
    conflict = _manifest_conflict(outdir, settings)
    if conflict and kept:
        raise UserError(f"--outdir {outdir} holds images made with other settings ({conflict}); pass "
                        "--overwrite to regenerate them or choose another --outdir")
    if kept and not (outdir / MANIFEST).exists():
        warn(f"--outdir {outdir} has no {MANIFEST} (written by an older difflab?); keeping its {kept} finished "
             "images as made with these settings")
    text = json.dumps(settings, indent=2) + "\n"
    if not (outdir / MANIFEST).is_file() or (outdir / MANIFEST).read_text() != text:
        atomic_write_text(outdir / MANIFEST, text)
    return todo


def generate(network: str | Path, seeds: Sequence[int], outdir: str | Path, batch: int = 64,
             subdirs: bool = False, class_idx: int | None = None, npz: bool = False, grid: bool = True,
             device: str | None = None, net_batch: int = NET_BATCH, progress: bool = True,
             overwrite: bool = False, tf32: bool = False, flags: dict[str, str] | None = None,
             sampler_grid: str | None = None, compile: bool = False, **sampler_overrides: Any) -> Path:
    """Write ``{seed:06d}.png`` (or ``images.npz``) plus a montage ``grid.png`` for ``seeds`` into ``outdir``.

    Sampler settings default to the run's ``sampler`` section; ``sampler_overrides`` (``sampler``,
    ``steps``, ``S_churn``, ...) replace them; ``sampler_grid`` is the sampler's sigma grid (``--grid``; ``grid``
    here is the montage). Seeds are split across ranks under torchrun.

    Resumable (docs/reliability.md): seeds whose PNG is already complete are skipped, temp files of a
    killed run are removed, and ``generate.json`` records the settings so that a rerun with other
    settings is refused instead of mixing images (``overwrite=True`` regenerates every seed). With
    ``npz`` each finished batch is kept in ``.images.npz.parts/`` until ``images.npz`` is written.
    Since an image depends on its seed alone, a resumed folder equals an uninterrupted one byte for byte.
    Every argument is checked before anything is written (:class:`SamplerOptions`); ``flags`` names the
    options as the user typed them, for the error line. ``compile`` runs the backbone through
    ``torch.compile`` (opt-in, :func:`compile_backbone`).
    """
    batch = check_value("--batch", batch, min=1)
    net_batch = check_value("--net-batch", net_batch, min=1)
    outdir = check_folder_arg(outdir, "--outdir")
    seeds = check_seeds(seeds)
    dev = dist.init(device)
    rank, world = dist.rank(), dist.world_size()
    model, cfg, _ = load_run(network, dev)
    check_class(model, class_idx)
    if compile:
        compile_backbone(model)
    sampler_overrides["grid"] = sampler_grid
    kw = sampler_kwargs(model, cfg.sampler, check_sampler_options(
        model, cfg.sampler, {k: v for k, v in sampler_overrides.items() if v is not None}, flags))
    side = output_resolution(cfg)
    shape = (int(cfg.image["channels"]), side, side)
    plan: tuple[list[int] | None, str | None] = (None, None)
    if rank == 0:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            plan = (_plan(outdir, seeds, _settings(network, kw, class_idx, net_batch, compile), shape, subdirs, npz,
                          overwrite), None)
        except (UserError, OSError) as e:  # every rank stops with the same line
            plan = (None, str(e) if isinstance(e, UserError) else f"--outdir {outdir}: {e}")
    todo, error = dist.broadcast_object(plan)
    if error:
        raise UserError(error)
    if progress and rank == 0 and len(todo) < len(seeds):
        echo(f"generate: {len(seeds) - len(todo)} of {len(seeds)} seeds already in {outdir}; "
             f"generating {len(todo)} (--overwrite regenerates all)")
    stats: dict[str, Any] = {}
    for batch_seeds, images in generate_batches(model, todo, batch, kw, dev, rank, world, class_idx, net_batch,
                                                progress, tf32, info=stats) if todo else ():
        if npz:
            arr = images.numpy().transpose(0, 2, 3, 1)  # NHWC uint8 like DDDM/improved-diffusion
            part = outdir / NPZ_PARTS / f"{batch_seeds[0]:06d}-{len(batch_seeds)}.npz"
            atomic_write_bytes(part, npz_bytes(images=arr, seeds=np.asarray(batch_seeds)))
        else:
            for seed, img in zip(batch_seeds, images.numpy()):
                save_png(seed_path(outdir, seed, subdirs), img)
    dist.barrier()
    if rank != 0:
        return outdir
    if npz:
        import shutil

        stored = _stored_npz(outdir, shape)
        missing = [s for s in seeds if s not in stored]
        if missing:  # a part vanished between the ranks' writes and now
            raise UserError(f"--outdir {outdir}: the images of seeds {missing[:3]} were lost; run again")
        order = sorted(seeds)
        if todo or _npz_seeds(outdir / NPZ) != order:  # a rerun with nothing new leaves the file alone
            data = npz_bytes(images=np.stack([stored[s] for s in order]), seeds=np.asarray(order))
            atomic_write_bytes(outdir / NPZ, data)
        shutil.rmtree(outdir / NPZ_PARTS, ignore_errors=True)
    if grid:
        if npz:
            imgs = [stored[s].transpose(2, 0, 1) for s in seeds[:64]]
        else:
            from PIL import Image

            imgs = []
            for s in seeds[:64]:
                a = np.asarray(Image.open(seed_path(outdir, s, subdirs)))
                imgs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        save_png(outdir / GRID, make_grid(np.stack(imgs)))
    if stats.get("nfe") and rank == 0:
        echo(f"mean NFE per image: {float(np.mean(stats['nfe'])):.1f}")
    return outdir
