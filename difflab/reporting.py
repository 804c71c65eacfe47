"""Run reports (the library behind ``difflab report``; docs/report.md): one HTML page with PNG plots that
compare runs — loss, learning rate and img/s against kimg, the in-training FID against kimg when the run
recorded it, the sample grids over training and, on request, FID against NFE for each run's sampler.

Several runs overlay on one plot per quantity (legend: run names). Every file is written atomically
(:mod:`difflab.runio`). matplotlib is the ``report`` extra.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.errors import UserError
from difflab.runio import atomic_write_bytes, atomic_write_text, check_folder_arg, mkdir, read_stats

SAMPLES_RE = re.compile(r"samples-(\d+)\.png$")
# quantity -> (stats key, y label, file); plotted against kimg
CURVES = {"loss": ("loss", "training loss (tick mean)", "loss.png"),
          "val_loss": ("val_loss", "held-out loss (EMA)", "val_loss.png"),
          "lr": ("lr", "learning rate", "lr.png"),
          "img_per_sec": ("img_per_sec", "training speed (img/s)", "img_per_sec.png"),
          "fid": ("fid", "in-training FID", "fid_vs_kimg.png")}
FID_NFE_PNG = "fid_vs_nfe.png"


@dataclass
class RunInfo:
    """One run of the report: its folder, a unique display name, its config and ``stats.jsonl`` records."""

    path: Path
    name: str
    config: dict[str, Any]
    stats: list[dict[str, Any]]
    grids: list[tuple[float, Path]]  # (kimg, samples-*.png) in training order


@dataclass
class Report:
    """What :func:`report` wrote: ``index`` (index.html), the PNGs, and for each plot the lines drawn on it
    as read back from the figure, ``{plot: [(label, xs, ys), ...]}``."""

    index: Path
    pngs: list[Path] = field(default_factory=list)
    plots: dict[str, list[tuple[str, list[float], list[float]]]] = field(default_factory=dict)
    fid_nfe: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("difflab report needs matplotlib: pip install 'difflab[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def open_run(path: str | Path) -> RunInfo:
    """A run directory written by ``difflab train`` (one line naming it otherwise)."""
    import json

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such run directory; give folders that `difflab train` wrote")
    opts = p / "training_options.json"
    if not opts.is_file():
        raise UserError(f"{path}: not a difflab run directory (no training_options.json); give a folder that "
                        "`difflab train` wrote")
    try:
        config = json.loads(opts.read_text())
        stats = read_stats(p)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable training_options.json or stats.jsonl ({e})") from None
    grids = sorted((int(m.group(1)), q) for q in p.glob("samples-*.png") if (m := SAMPLES_RE.search(q.name)))
    return RunInfo(p, p.resolve().name, config, stats, [(_snapshot_kimg(p, k), q) for k, q in grids])


def _snapshot_kimg(run: Path, kimg: int) -> float:
    """A grid's exact kimg from the checkpoint of the same snapshot (the file names hold whole kimg only)."""
    import json

    meta = run / f"checkpoint-{kimg:06d}.json"
    try:
        return float(json.loads(meta.read_text())["kimg"])
    except (OSError, ValueError, KeyError, TypeError):
        return float(kimg)


def _unique_names(runs: list[RunInfo]) -> None:
    """Runs with the same folder name get their parent folder's name in front (``a/00000-x``, ``b/00000-x``)."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise UserError(f"the same run is given twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _lines(ax) -> list[tuple[str, list[float], list[float]]]:
    return [(ln.get_label(), [float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
            for ln in ax.get_lines()]


def _curve_plot(plt, series: list[tuple[str, list[float], list[float]]], ylabel: str, title: str, path: Path,
                xlabel: str = "kimg (thousands of training images)", marker: str | None = None):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker=marker or ("o" if len(xs) < 20 else None), markersize=3)
    ys_all = [y for _, _, ys in series for y in ys]
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save_figure(fig, path)
    lines = _lines(ax)
    plt.close(fig)
    return lines


def count_nfe(model, sampler_kwargs: dict[str, Any], device=None) -> int:
    """Network evaluations per image of ``sampler_kwargs``, counted by sampling one image (seed 0)."""
    from difflab.generate import generate_batches

    calls = [0]
    handle = model.net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        for _ in generate_batches(model, [0], batch=1, sampler_kwargs=sampler_kwargs, device=device, progress=False):
            pass
    finally:
        handle.remove()
    return calls[0]


def steps_for_nfe(model, sampler_kwargs: dict[str, Any], nfe: int, device=None) -> tuple[int, int]:
    """``(steps, measured NFE)`` of the run's sampler closest to ``nfe`` evaluations (ties: fewer); samplers
    differ (Heun 2N-1, DPM-Solver 2M N, a predictor-corrector N(c+1)), so it is measured, not assumed."""
    measured: dict[int, int] = {}

    def at(steps: int) -> int:
        if steps not in measured:
            measured[steps] = count_nfe(model, {**sampler_kwargs, "steps": steps}, device)
        return measured[steps]

    steps = max(1, nfe)
    for _ in range(4):  # evaluations grow about linearly in steps: a few secant moves reach the target
        got = at(steps)
        if got == nfe:
            break
        nxt = max(1, round(steps * nfe / max(got, 1)))
        if nxt in measured:
            break
        steps = nxt
    near = min(measured, key=lambda s: (abs(measured[s] - nfe), measured[s]))
    for s in (near - 1, near + 1):  # a target between two step counts gets the nearer one
        if s >= 1:
            at(s)
    best = min(measured, key=lambda s: (abs(measured[s] - nfe), measured[s]))
    return best, measured[best]


def fid_vs_nfe(run: RunInfo, nfes: Sequence[int], num: int, ref=None, detector=None, batch: int = 64,
               device: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """FID of ``num`` samples (seeds 0..num-1) at each NFE for the run's own sampler, against ``ref`` (a
    reference .npz; default the run's ``--fid-ref``, else its training data)."""
    from difflab.build import load_run
    from difflab.generate import check_sampler_options
    from difflab.metrics.evaluate import calc_model

    model, cfg, _ = load_run(run.path, device=device)
    if ref is None:
        ref = cfg.train.fid_ref
    if ref is None:
        from difflab.data import open_dataset
        from difflab.metrics.fid import dataset_ref_stats

        ref = dataset_ref_stats(open_dataset(**cfg.data), detector=detector, progress=progress)
    check_sampler_options(model, cfg.sampler, {"steps": max(nfes)}, {"steps": "--nfe"})
    out = []
    for nfe in nfes:
        steps, got = steps_for_nfe(model, dict(cfg.sampler), nfe, device)
        kwargs = {**cfg.sampler, "steps": steps}
        fid = calc_model(model, ref, list(range(num)), metrics=("fid",), batch=batch, detector=detector,
                         sampler_kwargs=kwargs, device=device, progress=progress)["fid"]
        out.append({"target_nfe": nfe, "nfe": got, "steps": steps, "fid": float(fid),
                    "sampler": str(kwargs.get("sampler", "default")), "num": num})
    return out


def parse_nfe(text: str | Sequence[int] | None) -> list[int]:
    """``"5,10,20,35"`` -> ``[5, 10, 20, 35]`` (one line naming ``--nfe`` otherwise)."""
    if text is None:
        return []
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        values = [int(v) for v in items]
    except (TypeError, ValueError):
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"--nfe {text!r}: give positive integers, e.g. --nfe 5,10,20,35")
    return sorted(set(values))


def report(runs: Sequence[str | Path], out: str | Path, nfe: str | Sequence[int] | None = None, num: int = 256,
           ref: str | Path | None = None, detector=None, batch: int = 64, device: str | None = None,
           progress: bool = False) -> Report:
    """Write ``out/index.html`` and its PNGs for ``runs`` (run directories); with ``nfe`` (``"5,10,20,35"``)
    also FID of ``num`` samples against NFE for each run's sampler (:func:`fid_vs_nfe`). Returns a
    :class:`Report` with what each plot shows."""
    from difflab.options import check_value

    if not runs:
        raise UserError("difflab report: give at least one run directory")
    num = check_value("--num", num, min=2)
    nfes = parse_nfe(nfe)
    if ref is not None and not Path(ref).is_file():
        raise UserError(f"--ref {ref}: no such file; make one with `difflab fid ref --data DATASET --dest REF.npz`")
    infos = [open_run(r) for r in runs]
    _unique_names(infos)
    if nfes:
        from difflab.runio import resolve_checkpoint

        for r in infos:
            resolve_checkpoint(r.path)  # --nfe samples the last checkpoint: one line now if there is none
    out = check_folder_arg(out, "--out")
    plt = _pyplot()
    mkdir(out)
    rep = Report(index=out / "index.html")

    for key, (stat, ylabel, fname) in CURVES.items():
        series = []
        for r in infos:
            pts = [(s["kimg"], s[stat]) for s in r.stats if stat in s and "kimg" in s]
            if pts:
                series.append((r.name, [p[0] for p in pts], [p[1] for p in pts]))
        if series or key in ("loss", "lr", "img_per_sec"):
            rep.plots[key] = _curve_plot(plt, series, ylabel, f"{ylabel} vs kimg", out / fname)
            rep.pngs.append(out / fname)

    if nfes:
        series = []
        for r in infos:
            pts = fid_vs_nfe(r, nfes, num, ref=ref, detector=detector, batch=batch, device=device,
                             progress=progress)
            rep.fid_nfe[r.name] = pts
            series.append((f"{r.name} ({pts[0]['sampler']})", [p["nfe"] for p in pts], [p["fid"] for p in pts]))
        rep.plots["fid_nfe"] = _curve_plot(plt, series, f"FID ({num} samples)", "FID vs NFE", out / FID_NFE_PNG,
                                           xlabel="NFE (network evaluations per image)", marker="o")
        rep.pngs.append(out / FID_NFE_PNG)

    grids: dict[str, list[tuple[float, str]]] = {}
    for i, r in enumerate(infos):
        for kimg, src in r.grids:
            rel = f"samples/run{i}/{src.name}"
            atomic_write_bytes(out / rel, src.read_bytes())
            rep.pngs.append(out / rel)
            grids.setdefault(r.name, []).append((kimg, rel))
    atomic_write_text(rep.index, _html(infos, rep, grids, nfes, num))
    return rep


def _html(infos: list[RunInfo], rep: Report, grids: dict[str, list[tuple[float, str]]], nfes: list[int],
          num: int) -> str:
    e = html.escape
    rows = []
    for r in infos:
        ticks = [s for s in r.stats if "loss" in s]
        fids = [s for s in r.stats if "fid" in s]
        c = r.config
        rows.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
            r.name, c.get("method", {}).get("name", "?"), c.get("network", {}).get("name", "?"),
            c.get("sampler", {}).get("sampler", "default"), f"{ticks[-1]['kimg']:.3f}" if ticks else "—",
            ticks[-1].get("step", "—") if ticks else "—", f"{ticks[-1]['loss']:.4g}" if ticks else "—",
            f"{fids[-1]['fid']:.3f} (kimg {fids[-1]['kimg']:.1f})" if fids else "—", str(r.path))) + "</tr>")
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>difflab report: {e(', '.join(r.name for r in infos))}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}img.plot{max-width:100%;margin:.5em 0}"
             "figure{display:inline-block;margin:4px;text-align:center}figure img{image-rendering:pixelated;"
             "width:160px}figcaption{font-size:80%}</style></head><body>",
             "<h1>difflab report</h1>",
             "<table><tr><th>run</th><th>method</th><th>network</th><th>sampler</th><th>kimg</th><th>step</th>"
             "<th>last loss</th><th>last FID</th><th>folder</th></tr>", *rows, "</table>"]
    titles = {"loss": "Training loss", "val_loss": "Held-out loss", "lr": "Learning rate",
              "img_per_sec": "Training speed", "fid": "FID during training", "fid_nfe": "FID vs NFE"}
    for key, lines in rep.plots.items():
        fname = FID_NFE_PNG if key == "fid_nfe" else CURVES[key][2]
        note = "" if lines else " <em>(no run recorded this)</em>"
        parts.append(f"<h2>{titles[key]}{note}</h2><img class=\"plot\" src=\"{fname}\" alt=\"{titles[key]}\">")
        if key == "fid_nfe":
            parts.append(f"<p>FID of {num} samples (seeds 0..{num - 1}) for each run's own sampler; NFE as "
                         f"measured, nearest to the targets {', '.join(map(str, nfes))}.</p><table><tr><th>run</th>"
                         "<th>sampler</th><th>steps</th><th>NFE</th><th>FID</th></tr>")
            for name, pts in rep.fid_nfe.items():
                parts += [f"<tr><td>{e(name)}</td><td>{e(p['sampler'])}</td><td>{p['steps']}</td><td>{p['nfe']}"
                          f"</td><td>{p['fid']:.3f}</td></tr>" for p in pts]
            parts.append("</table>")
    parts.append("<h2>Sample grids over training</h2>")
    for r in infos:
        parts.append(f"<h3>{e(r.name)}</h3>")
        if r.name not in grids:
            parts.append("<p><em>no samples-*.png in this run yet</em></p>")
        for kimg, rel in grids.get(r.name, []):
            parts.append(f"<figure><img src=\"{e(rel)}\" alt=\"samples at kimg {kimg:.3g}\">"
                         f"<figcaption>kimg {kimg:.3g}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
