"""The one training loop (DESIGN.md "train/"): every method trains through :func:`train`.

Determinism is designed in, so that a resumed run equals an uninterrupted one and N ranks equal one:

* data order: global sample position ``p`` (0, 1, 2, ...) maps to a dataset index through a per-epoch
  permutation seeded by ``(seed, epoch)``; step ``s`` consumes positions ``[s B, (s+1) B)``, rank ``r``
  takes its contiguous share, accumulation rounds split that share;
* per-sample noise: every draw of the loss (and augmentation) for position ``p`` comes from a
  generator seeded by ``seed * 2^40 + p`` (difflab.rng), so it does not depend on how the batch is split;
* the global torch RNG (dropout) is reseeded from ``(seed, step, rank, round)`` before each forward;
* method training state (difflab.methods.base, DESIGN.md "Method state") is held here, not in the model:
  each loss reads it as of the end of the previous step, and after the optimizer step the rows the losses
  recorded on every rank are gathered, ordered by sample position and applied, identically on each rank.

What survives faults (docs/reliability.md): a checkpoint is one consistent unit (difflab.runio.checkpoints);
none is written for an interval with non-finite losses, gradients or weights; SIGTERM/SIGINT finish the step,
write a checkpoint and stop (:class:`~difflab.errors.Stopped`); ``--snap-minutes`` bounds the work a kill
loses; on resume the stored options win and a differing given one is refused (:func:`resume_config`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from difflab import distributed as dist
from difflab import runio as ck
from difflab.build import build_model, resolve_image
from difflab.config import RunConfig
from difflab.errors import Stopped, UserError, echo
from difflab.methods.base import Batch
from difflab.options import validate
from difflab.rng import StackedRandomGenerator, parse_seeds
from difflab.runio import read_stats  # noqa: F401 - its old home
from difflab.training.ema import ema_beta, update_ema
from difflab.training.logging import RunLogger
from difflab.utils import fp32_precision, make_grid, save_png, set_tf32

MAX_NONFINITE_STEPS = 10
# training options a resume may change (applied, and recorded in training_options.json except the last):
# the length and the checkpoint bookkeeping, never the trajectory's settings
RESUME_OPTIONS = ("duration_kimg", "workers", "keep_checkpoints", "snap_minutes", "stop_after_steps", "compile",
                  "channels_last")
_UNSET = object()


# ---- data order ----------------------------------------------------------------------------------

class PositionDataset(torch.utils.data.Dataset):
    """Maps a global sample position to ``(image, label, position, dataset index)`` through per-epoch
    permutations; the position's data epoch is ``position // len(self)``."""

    def __init__(self, dataset, indices: np.ndarray, seed: int):
        self.dataset, self.indices, self.seed = dataset, indices, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:  # positions are unbounded; DataLoader only needs a sampler
        return len(self.indices)

    def index_of(self, pos: int) -> int:
        epoch, off = divmod(pos, len(self.indices))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.indices)))
        return int(self.indices[self._perm[1][off]])

    def __getitem__(self, pos: int):
        index = self.index_of(pos)
        image, label, _ = self.dataset[index]
        return torch.from_numpy(np.ascontiguousarray(image)), int(label), pos, index


class PositionSampler(torch.utils.data.Sampler):
    """Yields this rank's positions from ``start_step`` on, forever."""

    def __init__(self, batch: int, rank: int, world: int, start_step: int):
        self.batch, self.rank, self.world, self.start_step = batch, rank, world, start_step

    def __iter__(self) -> Iterator[int]:
        share = self.batch // self.world
        step = self.start_step
        while True:
            base = step * self.batch + self.rank * share
            yield from range(base, base + share)
            step += 1


def loss_seeds(seed: int, positions: torch.Tensor) -> list[int]:
    return [seed * (1 << 40) + int(p) for p in positions]


def gather_state_updates(records: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> dict[str, dict[str, torch.Tensor]]:
    """One step's :meth:`Batch.record` rows from every micro-batch ``(positions, indices, updates)`` of every
    rank, concatenated in sample-position order (so 1 rank and N ranks apply the same rows in the same order),
    each update with ``position`` and ``index`` (dataset index) rows added."""
    names = sorted(records[0][2])
    if any(sorted(r[2]) != names for r in records):
        raise RuntimeError("every micro-batch must record the same training-state updates")
    positions = dist.all_gather_cat(torch.cat([r[0] for r in records]))
    indices = dist.all_gather_cat(torch.cat([r[1] for r in records]))
    order = torch.argsort(positions)
    out = {}
    for name in names:
        rows = {key: dist.all_gather_cat(torch.cat([r[2][name][key] for r in records])) for key in records[0][2][name]}
        out[name] = {**{k: v[order.to(v.device)] for k, v in rows.items()},
                     "position": positions[order], "index": indices[order]}
    return out


# ---- learning rate ----------------------------------------------------------------------------------

def learning_rate(opts, nimg: int) -> float:
    lr = opts.lr
    if opts.lr_rampup_kimg > 0:
        lr *= min(nimg / (opts.lr_rampup_kimg * 1000), 1.0)
    if opts.lr_schedule == "cosine":
        frac = min(nimg / (opts.duration_kimg * 1000), 1.0)
        lr *= 0.5 * (1 + math.cos(math.pi * frac))
    elif opts.lr_schedule != "constant":
        raise UserError(f"--lr-schedule {opts.lr_schedule!r}: use constant or cosine")
    return lr


def ema_step_beta(opts, step: int, nimg: int) -> float | None:
    """EMA weight for the update after optimizer step ``step`` (counted including it; ``nimg`` images were
    seen before it), or None when the step skips the EMA: plain decay updates every ``ema_every`` steps.
    EDM ramps the half-life on the images seen BEFORE this step; DDPM's start step counts this step."""
    if opts.ema_decay is not None and step % opts.ema_every != 0:
        return None
    return ema_beta(opts.batch, nimg, step, opts.ema_halflife_kimg, opts.ema_rampup_ratio, opts.ema_decay,
                    opts.ema_start_step)


# ---- setup ---------------------------------------------------------------------------------------

def _split_holdout(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if holdout <= 0:
        return np.arange(n), np.arange(0)
    if holdout >= n:
        raise UserError(f"--holdout {holdout}: must be smaller than the dataset ({n} images)")
    perm = np.random.default_rng([seed, 1 << 20]).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def _make_optimizer(opts, params) -> torch.optim.Optimizer:
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr, betas=opts.betas, eps=opts.eps, weight_decay=opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=opts.lr, betas=opts.betas, eps=opts.eps, weight_decay=opts.weight_decay)
    raise UserError(f"--optimizer {opts.optimizer!r}: use adam or adamw")


def _check_batch(opts, world: int) -> tuple[int, int]:
    if opts.batch % world:
        raise UserError(f"--batch {opts.batch} is not divisible by the {world} ranks; use a multiple of {world}")
    share = opts.batch // world
    batch_gpu = opts.batch_gpu or share
    if batch_gpu > share or share % batch_gpu:
        raise UserError(f"--batch-gpu {batch_gpu} must divide the per-rank batch {share} (--batch / ranks)")
    return share, batch_gpu


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise UserError(f"--precision {precision!r}: use fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_dir_name(cfg: RunConfig, outdir: Path, world: int) -> Path:
    ids = [int(p.name[:5]) for p in outdir.glob("[0-9][0-9][0-9][0-9][0-9]-*") if p.name[:5].isdigit()] \
        if outdir.exists() else []
    data = Path(str(cfg.data.get("source", "data"))).stem.replace("-", "") or "data"
    cond = "cond" if cfg.image.get("label_dim") else "uncond"
    desc = f"{data}-{cond}-{cfg.network['name']}-{cfg.method['name']}-gpus{world}-batch{cfg.train.batch}-" \
           f"{cfg.train.precision}"
    return outdir / f"{max(ids, default=-1) + 1:05d}-{desc}"


def _option_name(section: str, key: str) -> str:
    """How a user names ``section.key``: its flag for training/data options, else ``section.key``."""
    from difflab.config import DataOptions, TrainOptions
    from difflab.options import specs

    if section == "train" and key in specs(TrainOptions):
        return specs(TrainOptions)[key].flag
    if section == "data" and key in specs(DataOptions):
        return specs(DataOptions)[key].flag
    return {("method", "name"): "--method", ("network", "name"): "--arch"}.get((section, key), f"{section}.{key}")


def resume_config(cfg: RunConfig, stored: RunConfig, run_dir: Path) -> tuple[RunConfig, dict[str, tuple]]:
    """The config a resume continues with: ``stored`` (the run's training_options.json), with only
    :data:`RESUME_OPTIONS` taken from ``cfg``. Any other value of ``cfg`` that differs from the stored one is
    refused in one line (nothing is dropped silently). Returns the config and the recorded changes
    ``{key: (stored, given)}``."""
    given, kept = (json.loads(json.dumps(c.to_dict(), default=list)) for c in (cfg, stored))
    diffs = []
    for section in ("data", "method", "network", "train", "sampler"):
        g, s = given.get(section) or {}, kept.get(section) or {}
        for key in sorted(set(g) | set(s), key=lambda k: (k != "name", k)):
            if section == "train" and key in RESUME_OPTIONS:
                continue
            if g.get(key, _UNSET) != s.get(key, _UNSET):
                diffs.append((section, key, g.get(key, "(unset)"), s.get(key, "(unset)")))
    if diffs:
        section, key, new, old = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(_option_name(d[0], d[1]) for d in diffs[1:4])})" \
            if len(diffs) > 1 else ""
        raise UserError(f"{_option_name(section, key)} {_show(new)} differs from the run's stored {key} {_show(old)}"
                        f"{more}; {run_dir} resumes with its stored options: drop the flag, pass --from-scratch to "
                        "start anew there, or use another --run-dir")
    out = copy.deepcopy(stored)
    changes = {}
    for key in RESUME_OPTIONS:
        old, new = getattr(stored.train, key), getattr(cfg.train, key)
        setattr(out.train, key, new)
        if key != "stop_after_steps" and old != new:
            changes[key] = (old, new)
    return out, changes


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _quiet_worker(_: int) -> None:
    """Data-loader workers leave SIGINT/SIGTERM to the main process, which finishes the step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While training, SIGTERM and SIGINT only append their number to the yielded list (the loop finishes the
    step, writes a checkpoint and stops); a second signal acts as it did before. The previous handlers come
    back on exit. Outside the main thread (no handlers possible) nothing is installed."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {}

    def handler(signum, frame):
        if got:  # asked twice: stop now, the usual way
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        got.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(sig)
        previous[sig] = old if old is not None else signal.SIG_DFL
        signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def all_finite(*modules: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``modules`` is finite."""
    return all(bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values()
               if t.is_floating_point())


# ---- the loop ------------------------------------------------------------------------------------

def train(cfg: RunConfig, run_dir: str | Path | None = None, outdir: str | Path = "runs",
          device: str | None = None, progress: bool = True, resume_from: str | Path | None = None,
          from_scratch: bool = False) -> Path:
    """Train ``cfg``; resumes automatically when ``run_dir`` already holds a checkpoint (the latest one,
    or ``resume_from``). Returns the run directory; ``run_dir=None`` makes a new numbered one in ``outdir``.
    ``from_scratch`` starts anew in an existing ``run_dir``, first moving what it holds into
    ``run_dir/previous-*/`` (:func:`~difflab.runio.archive_run`).
    TF32 stays off unless the run's ``train.tf32`` opts in; the caller's settings come back afterwards.
    """
    with fp32_precision(False), dist.peer_errors(), stop_signals() as signals:
        return _train(cfg, run_dir, outdir, device, progress, resume_from, from_scratch, signals)


def _train(cfg: RunConfig, run_dir, outdir, device, progress, resume_from, from_scratch=False,
           signals: list[int] | None = None) -> Path:
    signals = [] if signals is None else signals
    validate(cfg.train)  # also what a script set on cfg.train after building it
    ck.check_folder_arg(*((run_dir, "--run-dir") if run_dir is not None else (outdir, "--outdir")))
    dev = dist.init(device)
    rank, world = dist.rank(), dist.world_size()
    if from_scratch:
        if resume_from is not None:
            raise UserError("--from-scratch starts a new run: drop --resume")
        if run_dir is None:
            raise UserError("--from-scratch needs --run-dir (the run directory to start anew)")
        if rank == 0:
            moved = ck.archive_run(run_dir)
            if moved is not None:
                echo(f"--from-scratch: moved the earlier contents of {run_dir} to {moved}")
        dist.barrier()

    # Resume state, when the run dir has a checkpoint: its stored options win; a differing given one is refused.
    resume_json = None
    if resume_from is not None:
        resume_json = ck.resolve_checkpoint(resume_from)
        run_dir = resume_json.parent
    elif run_dir is not None and Path(run_dir).is_dir() and ck.list_checkpoints(run_dir):
        resume_json = ck.resolve_checkpoint(run_dir)
    resume_changes = {}
    if resume_json is not None:
        stored = RunConfig.load(Path(run_dir) / "training_options.json")
        cfg, resume_changes = resume_config(cfg, stored, Path(run_dir))
    opts = cfg.train
    set_tf32(opts.tf32)
    share, batch_gpu = _check_batch(opts, world)
    rounds = share // batch_gpu

    dataset = resolve_image(cfg)  # fills cfg.image (and data.crop_to for --pad-to) from the data
    train_idx, holdout_idx = _split_holdout(len(dataset), opts.holdout, opts.seed)
    use_labels = bool(cfg.data.get("use_labels", False))

    torch.manual_seed(opts.seed)  # the initial weights depend on the run seed only
    model = build_model(cfg).to(dev)
    model.train()
    optimizer = _make_optimizer(opts, model.parameters())
    step = nimg = 0
    # The method's training state lives here, outside the model: never in ema, never broadcast by DDP.
    state = {k: v.to(dev) for k, v in model.init_training_state(
        len(dataset), torch.Generator().manual_seed(opts.seed)).items()}
    if resume_json is not None:
        meta, tensors = ck.read_checkpoint(resume_json)
        ck.check_finite(tensors, str(resume_json))
        ck.load_module(model, tensors, "model", str(resume_json))
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        ck.load_module(ema, tensors, "ema", str(resume_json))
        ck.load_optimizer(optimizer, tensors, meta)
        ck.load_training_state(state, tensors, str(resume_json), model.legacy_state_keys)
        step, nimg = int(meta["step"]), int(meta["nimg"])
        best_val = meta.get("best_val")
        tick_losses = list(meta.get("tick_losses", []))
        partial_tick = meta.get("tick_loss_sum") if rank == 0 else None  # a checkpoint written mid-tick
    else:
        model.fit_data(dataset)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        best_val, tick_losses, partial_tick = None, [], None

    # Run directory (rank 0 writes; the name is agreed by broadcast).
    if run_dir is None:
        run_dir = run_dir_name(cfg, Path(outdir), world) if rank == 0 else None
        run_dir = dist.broadcast_object(run_dir)
    run_dir = Path(run_dir)
    log = RunLogger(run_dir, enabled=(rank == 0), wandb_project=opts.wandb, config=cfg.to_dict())
    if rank == 0 and resume_json is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "training_options.json")
    if rank == 0 and resume_json is not None:
        ck.remove_stale_temps(run_dir, "checkpoint-*")  # what a kill during a checkpoint write left
        if resume_changes:
            cfg.save(run_dir / "training_options.json")
    log.log(f"{'Resuming from ' + str(resume_json) if resume_json else 'Training'} in {run_dir}")
    for key, (old, new) in resume_changes.items():
        log.log(f"resume: {_option_name('train', key)} {_show(new)} (was {_show(old)}), recorded in "
                "training_options.json")
    nparams = sum(p.numel() for p in model.parameters())
    log.log(f"dataset {dataset.name}: {len(train_idx)} images {dataset.image_shape}, labels {cfg.image['label_dim']};"
            f" {cfg.method['name']} on {cfg.network['name']} ({nparams / 1e6:.2f}M params); device {dev}, "
            f"{world} rank(s), batch {opts.batch} = {world} x {rounds} x {batch_gpu}")

    if opts.channels_last:  # in place (the optimizer keeps its parameters); the EMA copy keeps the usual layout
        model.net.to(memory_format=torch.channels_last)
    if opts.compile:  # in place: parameter names, checkpoints and the EMA copy stay those of the eager net
        model.net.compile()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    augment_pipe = None
    if opts.augment_p > 0:
        from difflab.data.augment import AugmentPipe

        augment_pipe = AugmentPipe(p=opts.augment_p)
    scaler = torch.amp.GradScaler(dev.type) if opts.precision == "fp16" and dev.type == "cuda" else None

    pos_data = PositionDataset(dataset, train_idx, opts.seed)
    loader = torch.utils.data.DataLoader(
        pos_data, batch_size=batch_gpu, sampler=PositionSampler(opts.batch, rank, world, step),
        num_workers=opts.workers, pin_memory=dev.type == "cuda", persistent_workers=opts.workers > 0,
        prefetch_factor=4 if opts.workers > 0 else None, worker_init_fn=_quiet_worker if opts.workers else None)
    batches = iter(loader)

    total_steps = math.ceil(opts.duration_kimg * 1000 / opts.batch)
    stop_step = min(total_steps, opts.stop_after_steps) if opts.stop_after_steps else total_steps
    tick_nimg = max(int(opts.tick_kimg * 1000), 1)
    next_tick = (nimg // tick_nimg + 1) * tick_nimg
    ticks_done = nimg // tick_nimg
    tick_start_time, tick_start_nimg = time.time(), nimg
    loss_sum = torch.zeros(2, dtype=torch.float64, device=dev)  # (sum of example losses, count) in this tick
    if partial_tick is not None:
        loss_sum += torch.tensor(partial_tick, dtype=torch.float64, device=dev)
    nonfinite_run = 0
    bad_steps = 0  # steps with non-finite losses or gradients since the last snapshot: no checkpoint of them
    last_snap_step, last_snap_time = step, time.time()
    bar = dist.progress(total_steps, "train", unit="step", initial=step) if progress and rank == 0 else None
    first_step = step  # without a progress bar the first step gets a line too, not only each tick

    def snapshot(full: bool = True) -> None:
        """Checkpoint (+ with ``full``: validation loss, checkpoint-best, sample grid, FID); nothing when a step
        since the last snapshot was non-finite or a weight is (the run dir keeps its last good checkpoint)."""
        nonlocal best_val, bad_steps, last_snap_step, last_snap_time
        kimg = nimg // 1000
        bad, bad_steps = bad_steps, 0
        last_snap_step, last_snap_time = step, time.time()
        optim_finite = all(bool(torch.isfinite(v).all()) for st in optimizer.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor) and v.is_floating_point())
        if bad or not (all_finite(model, ema) and optim_finite):
            why = f"{bad} step(s) since the last snapshot had non-finite losses or gradients" if bad \
                else "the weights or the optimizer state are not finite"
            log.log(f"no checkpoint at step {step} (kimg {nimg / 1000:.3f}): {why}")
            dist.barrier()
            return
        partial = dist.all_reduce_sum(loss_sum.clone())  # a snapshot between ticks keeps the tick's loss so far
        val = _validation_loss(ema, dataset, holdout_idx, use_labels, opts, dev) \
            if full and len(holdout_idx) else None
        if rank == 0:
            meta = {"step": step, "nimg": nimg, "kimg": nimg / 1000, "time": time.time(),
                    "tick_losses": tick_losses[-max(opts.early_stop_window, 1) - 1:], "best_val": best_val,
                    "tick_loss_sum": partial.tolist()}
            if val is not None and (best_val is None or val < best_val):
                best_val = meta["best_val"] = val
                ck.save_checkpoint(run_dir / "checkpoint-best", model, ema, None, meta)
                log.log(f"new best held-out loss {val:.5f} at kimg {nimg / 1000:.1f}")
            ck.save_checkpoint(ck.new_checkpoint_stem(run_dir, kimg, step), model, ema, optimizer, meta, state)
            ck.prune_checkpoints(run_dir, opts.keep_checkpoints)
            if val is not None:
                log.stats({"kimg": nimg / 1000, "val_loss": val}, step)
        if full:
            _write_grid(ema, cfg, run_dir / f"samples-{kimg:06d}.png", dev, rank, world)
            log.image(run_dir / f"samples-{kimg:06d}.png", step)
        if full and opts.fid_every and (ticks_done // max(opts.snapshot_ticks, 1)) % opts.fid_every == 0:
            fid = _small_fid(ema, cfg, dataset, dev, opts)
            if rank == 0:
                log.stats({"kimg": nimg / 1000, "fid": fid}, step)
                log.log(f"FID ({opts.fid_num} samples) at kimg {nimg / 1000:.1f}: {fid:.3f}")
        dist.barrier()

    stop_reason, stop_signal = None, None
    while step < stop_step:
        lr = learning_rate(opts, nimg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        records = []
        for r in range(rounds):
            images, labels, positions, indices = next(batches)
            images = images.to(dev, non_blocking=True)
            x0 = model.encode(images)
            rng = StackedRandomGenerator(dev, loss_seeds(opts.seed, positions))
            aug_labels = None
            if augment_pipe is not None:
                x0, aug_labels = augment_pipe(x0, rng)
            class_labels = labels.to(dev) if use_labels else None
            torch.manual_seed(hash((opts.seed, step, rank, r)) % (1 << 62))
            sync = contextlib.nullcontext() if (world == 1 or r == rounds - 1) else ddp.no_sync()
            batch = Batch(x0, class_labels, rng, aug_labels, index=indices.to(dev),
                          epoch=(positions // len(train_idx)).to(dev), step=step, state=state)
            with sync:
                with _autocast(dev, opts.precision):
                    per_example = ddp(batch)
                loss = per_example.float().sum() * (world / opts.batch)
                (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += torch.stack([per_example.detach().double().sum(),
                                     torch.tensor(float(len(per_example)), dtype=torch.float64, device=dev)])
            if batch.updates:
                records.append((positions.to(dev), indices.to(dev), batch.updates))
        if scaler:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # one host sync for the whole check, not one per parameter
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        finite = finite.to(dev, torch.float32).reshape(1)
        finite = bool(dist.all_reduce_sum(finite).item() == world)
        nonfinite_run = 0 if finite else nonfinite_run + 1
        bad_steps += not finite and scaler is None  # fp16's scaler skips such steps itself
        if nonfinite_run >= MAX_NONFINITE_STEPS:
            good = ck.list_checkpoints(run_dir) if run_dir.is_dir() else []
            kept = f"run dir {run_dir} keeps its last good checkpoint, {good[-1].name}" if good else \
                f"no checkpoint was written to {run_dir}"
            raise UserError(f"the loss/gradients were non-finite for {MAX_NONFINITE_STEPS} steps in a row at "
                            f"kimg {nimg / 1000:.1f}; lower --lr or use --precision fp32 ({kept})")
        if not finite:  # (finite gradients pass nan_to_num unchanged: skip the per-parameter loop)
            for g in grads:
                torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
        if opts.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if records:
            model.update_training_state(state, gather_state_updates(records))
        step += 1
        beta = ema_step_beta(opts, step, nimg)
        if beta is not None:
            update_ema(ema, model, beta)
        nimg += opts.batch
        if bar is not None:
            bar.update(1)

        done = step >= stop_step
        if bar is None and rank == 0 and step == first_step + 1 and not (nimg >= next_tick or done):
            log.log(f"kimg {nimg / 1000:8.2f}  step {step:7d}  first step in {time.time() - tick_start_time:.1f} s; "
                    f"next line at kimg {next_tick / 1000:.2f}")
        # a stop signal or the --snap-minutes clock: every rank must agree (the decision is all-reduced)
        clock = opts.snap_minutes is not None and time.time() - last_snap_time >= 60 * opts.snap_minutes
        want = torch.tensor([float(bool(signals)), float(clock)])
        if world > 1:
            want = dist.all_reduce_sum(want.to(dev)).cpu()
        stop_now, snap_due = bool(want[0] > 0), bool(want[1] > 0)
        if nimg >= next_tick or done:
            totals = dist.all_reduce_sum(loss_sum.clone())
            tick_loss = (totals[0] / totals[1].clamp(min=1)).item()
            loss_sum.zero_()
            elapsed = time.time() - tick_start_time
            speed = (nimg - tick_start_nimg) / max(elapsed, 1e-9)
            tick_start_time, tick_start_nimg = time.time(), nimg
            ticks_done += 1
            next_tick = (nimg // tick_nimg + 1) * tick_nimg
            tick_losses.append(tick_loss)
            if not math.isfinite(tick_loss) and scaler is None:
                bad_steps = max(bad_steps, 1)
            if rank == 0:
                log.stats({"kimg": nimg / 1000, "step": step, "loss": tick_loss, "lr": lr, "img_per_sec": speed,
                           "sec_per_kimg": 1000 / max(speed, 1e-9)}, step)
                msg = f"kimg {nimg / 1000:8.2f}  step {step:7d}  loss {tick_loss:.4f}  {speed:7.1f} img/s  lr {lr:.2e}"
                if bar is not None:
                    bar.set_postfix(loss=f"{tick_loss:.4f}", img_s=f"{speed:.1f}", kimg=f"{nimg / 1000:.1f}")
                    log.log(msg, echo=False)
                else:
                    log.log(msg)
            if opts.early_stop_delta is not None and len(tick_losses) > opts.early_stop_window:
                recent = np.asarray(tick_losses[-opts.early_stop_window - 1:])
                if np.abs(np.diff(recent)).mean() < opts.early_stop_delta:
                    stop_reason = (f"early stop: mean |change| of the last {opts.early_stop_window} tick losses "
                                   f"< {opts.early_stop_delta}")
                    done = True
            if done or ticks_done % max(opts.snapshot_ticks, 1) == 0:
                snapshot()
                tick_start_time = time.time()  # img/s measures training, not snapshot work
        if (stop_now or snap_due) and last_snap_step != step and not done:
            snapshot(full=False)
        if stop_now and not done:  # (a signal during the last step: the run is complete, nothing to resume)
            stop_signal = signals[0] if signals else signal.SIGTERM  # another rank was signalled
            break
        if done:
            break

    if bar is not None:
        bar.close()
    if stop_signal is not None:
        line = (f"stopped by {signal.Signals(stop_signal).name} at step {step}; resume with: "
                f"difflab train --resume {run_dir}")
        log.log(line)
        log.close()
        raise Stopped(line, int(stop_signal))
    if stop_reason:
        log.log(stop_reason)
    elif step < total_steps:
        log.log(f"stopped at step {step} (--stop-after-steps); resume with: difflab train --resume {run_dir}")
    else:
        log.log(f"done: {nimg / 1000:.1f} kimg in {step} steps")
    log.close()
    return run_dir


# ---- snapshot helpers -----------------------------------------------------------------------------

def _validation_loss(ema, dataset, holdout_idx, use_labels, opts, dev) -> float:
    """Mean per-example loss of the EMA model on the held-out images, with fixed per-image noise."""
    with torch.no_grad():
        total, count = 0.0, 0
        idx = [int(i) for i in holdout_idx]
        mine = idx[dist.rank()::dist.world_size()]
        for start in range(0, len(mine), 64):
            chunk = mine[start:start + 64]
            items = [dataset[i] for i in chunk]
            images = torch.from_numpy(np.stack([it[0] for it in items])).to(dev)
            labels = torch.tensor([it[1] for it in items], device=dev) if use_labels else None
            rng = StackedRandomGenerator(dev, [(1 << 50) + i for i in chunk])
            batch = Batch(ema.encode(images), labels, rng, index=torch.tensor(chunk, device=dev))
            total += float(ema(batch).double().sum())
            count += len(chunk)
        t = dist.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
        return float(t[0] / max(t[1], 1))


def _write_grid(ema, cfg: RunConfig, path: Path, dev, rank: int, world: int) -> None:
    from difflab.generate import generate_batches

    seeds = parse_seeds(cfg.train.grid_seeds)
    images = [img for _, img in generate_batches(ema, seeds, batch=64, sampler_kwargs=cfg.sampler, device=dev,
                                                 rank=rank, world=world, progress=False)]
    if world > 1:
        images = [dist.all_gather_cat(torch.cat(images))] if images else []
    if rank == 0 and images:
        save_png(path, make_grid(torch.cat(images)[: len(seeds)]))


def _small_fid(ema, cfg: RunConfig, dataset, dev, opts) -> float:
    from difflab.generate import generate_batches
    from difflab.metrics.fid import compute_fid_from_batches, dataset_ref_stats

    ref = opts.fid_ref or dataset_ref_stats(dataset)
    seeds = list(range(opts.fid_num))
    batches = (img for _, img in generate_batches(ema, seeds, batch=64, sampler_kwargs=cfg.sampler, device=dev,
                                                  rank=dist.rank(), world=dist.world_size(), progress=False))
    return float(compute_fid_from_batches(batches, ref))
