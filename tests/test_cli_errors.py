"""Bad values stop with one line (issue 12 items 6 and 8): every case exits 2 with exactly one stderr line
``difflab: error: ...``, no traceback and nothing written; the library raises UserError with the same line;
disk full / read-only file systems name the path and keep what was written; a dead DDP peer is one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import difflab
from difflab.cli import main
from difflab.errors import UserError
from difflab.runio import list_checkpoints
from difflab.training.loop import train
from tests.test_train import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny trained run, a tiny preset, a plain file, a damaged copy of the run."""
    root = tmp_path_factory.mktemp("cli")
    run = train(tiny_cfg(), run_dir=root / "run", progress=False)
    (root / "tiny.json").write_text(json.dumps(tiny_cfg().to_dict()))
    (root / "file").write_text("not a folder")
    nostep = root / "nostep"
    shutil.copytree(run, nostep)
    newest = list_checkpoints(nostep)[-1]
    meta = json.loads(newest.read_text())
    del meta["step"]
    newest.write_text(json.dumps(meta))
    negres = root / "negres"
    shutil.copytree(run, negres)
    opts = json.loads((negres / "training_options.json").read_text())
    opts["image"]["resolution"] = -8
    (negres / "training_options.json").write_text(json.dumps(opts))
    return root


GEN = ["generate", "--network", "{root}/run", "--outdir", "{new}/out", "--no-progress"]
TRAIN = ["train", "--preset", "{root}/tiny.json", "--run-dir", "{new}/run", "--no-progress"]
CASES = [  # (argv, fragment of the one line)
    (GEN + ["--seeds", "0-99999999999"], "--seeds 0-99999999999: 100000000000 seeds is more than 10000000"),
    (GEN + ["--seeds", "1,1", "--npz"], "--seeds 1,1: seed 1 is listed twice"),
    (GEN + ["--seeds", "5-1"], "--seeds 5-1: cannot parse '5-1'"),
    (GEN + ["--steps", "-5"], "--steps -5: must be >= 1"),
    (GEN + ["--steps", "0"], "--steps 0: must be >= 1"),
    (GEN + ["--steps", "2.5"], "--steps 2.5: --steps takes an integer"),
    (GEN + ["--solver", "bogus"], "--solver bogus: choose one of"),
    (GEN + ["--sampler", "ablation", "--solver", "rk45"], "--solver rk45: --sampler ablation takes one of euler, heun"),
    (GEN + ["--sampler", "bogus"], "--sampler 'bogus' is unknown"),
    (GEN + ["--net-batch", "0"], "--net-batch 0: must be >= 1"),
    (GEN + ["--batch", "0"], "--batch 0: must be >= 1"),
    (GEN[:4] + ["{root}/file"], "--outdir {root}/file: is a file, not a folder"),
    (GEN + ["--sigma_max", "-1"], "--sigma_max -1: must be > 0"),
    (GEN + ["--sigma_min", "2", "--sigma_max", "1"], "need sigma_min < sigma_max"),
    (GEN + ["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (GEN + ["--guidance", "2"], "--guidance 2.0: this model is unconditional"),
    (GEN + ["--class", "3"], "--class: this model is unconditional"),
    (GEN + ["-o", "bogus=1"], "-o bogus=1: unknown sampler option 'bogus'"),
    (GEN + ["-o", "steps=x"], "-o steps=x: --steps takes an integer"),
    (GEN + ["-o", "steps"], "-o 'steps': use KEY=VALUE"),
    (["generate", "--network", "{root}/nostep", "--outdir", "{new}/out"], "checkpoint field 'step' is missing"),
    (["generate", "--network", "{root}/negres", "--outdir", "{new}/out"], "image.resolution -8: must be >= 1"),
    (["info", "{root}/nostep"], "checkpoint field 'step' is missing"),
    (TRAIN + ["--resolution", "0"], "--resolution 0: must be >= 1"),
    (TRAIN + ["--resolution", "-8"], "--resolution -8: must be >= 1"),
    (TRAIN + ["--lr", "nan"], "--lr nan: must be a finite number (> 0)"),
    (TRAIN + ["--lr", "-1"], "--lr -1: must be > 0"),
    (TRAIN + ["--batch", "0"], "--batch 0: must be >= 1"),
    (TRAIN + ["--batch", "-1"], "--batch -1: must be >= 1"),
    (TRAIN + ["--batch", "x"], "--batch x: --batch takes an integer"),
    (TRAIN + ["--workers", "-1"], "--workers -1: must be >= 0"),
    (TRAIN + ["--seed", "-1"], "--seed -1: must be >= 0"),
    (TRAIN + ["-o", "train.batch=x"], "-o train.batch=x: --batch takes an integer"),
    (TRAIN + ["-o", "train.lr=[1]"], "-o train.lr=[1]: --lr takes a number"),
    (TRAIN + ["-o", "train.bogus=1"], "-o train.bogus=1: unknown training option 'bogus'"),
    (TRAIN + ["-o", "bogus.x=1"], "-o bogus.x=1: the section must be one of"),
    (TRAIN + ["-o", "lr=1"], "-o lr=1: use SECTION.KEY=VALUE"),
    (TRAIN + ["--dropout", "banana"], "--dropout banana: network option dropout takes a number"),
    (TRAIN + ["--num-blocks", "2.5"], "--num-blocks 2.5: network option num_blocks takes an integer"),
    (TRAIN + ["--bogus-option", "1"], "unknown option --bogus-option"),
    (TRAIN + ["--duration", "0"], "--duration 0: must be > 0"),
    (TRAIN + ["--duration", "-1"], "--duration -1: must be > 0"),
    (TRAIN + ["--augment", "2"], "--augment 2: must be >= 0 and <= 1"),
    (TRAIN + ["--snap", "0"], "--snap 0: must be >= 1"),
    (TRAIN + ["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0"),
    (TRAIN + ["--ema-decay", "2"], "--ema-decay 2: must be >= 0 and <= 1"),
    (TRAIN + ["--precision", "fp8"], "--precision fp8: choose one of fp32, bf16, fp16"),
    (TRAIN + ["--cond", "maybe"], "--cond maybe: --cond takes true or false"),
    (TRAIN + ["--grid-seeds", "1,1"], "--grid-seeds 1,1: seed 1 is listed twice"),
    (TRAIN[:4] + ["{root}/file"], "--run-dir {root}/file: is a file, not a folder"),
    (["train", "--preset", "{root}/tiny.json", "--outdir", "{root}/file"], "--outdir {root}/file: is a file"),
    (["nll", "--network", "{root}/run", "--num", "0"], "--num 0: must be >= 1"),
    (["nll", "--network", "{root}/run", "--rtol", "-1"], "--rtol -1.0: must be > 0"),
    (["nll", "--network", "{root}/run", "--t-eps", "2"], "--t-eps 2.0: must be > 0 and < 1"),
    (["fid", "ref", "--data", "digits", "--dest", "{root}/file/ref.npz"], "{root}/file is a file, not a folder"),
    (["fid", "ref", "--data", "digits", "--dest", "{new}/ref.txt"], "must end in .npz"),
    (["fid", "calc", "--images", "{root}", "--ref", "{new}/r.npz", "--num", "0"], "--num 0: must be >= 1"),
    (["fid", "calc", "--images", "{root}", "--ref", "{new}/r.npz", "--kid-subset-size", "1"], "must be >= 2"),
    (["dataset", "convert", "--source", "digits", "--dest", "{root}/file"], "--dest {root}/file already exists"),
    (["dataset", "convert", "--source", "digits", "--dest", "{new}/d", "--max-images", "0"], "--max-images 0"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(c[0][:1] + c[0][6:]) for c in CASES])
def test_bad_value_is_one_line_and_writes_nothing(env, tmp_path, capsys, argv, fragment):
    new = tmp_path / "new"
    argv = [a.format(root=env, new=new) for a in argv]
    before = snapshot(env)
    line = one_line_error(argv, capsys)
    assert fragment.format(root=env) in line
    assert not new.exists(), f"{line} but wrote {list(new.rglob('*'))}"
    assert snapshot(env) == before


def test_library_calls_raise_the_cli_line(env, tmp_path, capsys):
    """Item 8: a library call raises UserError whose message is the line the CLI prints."""
    from difflab.generate import generate
    from difflab.nll import nll

    run, preset = str(env / "run"), str(env / "tiny.json")
    pairs = [
        (lambda: difflab.train(preset, run_dir=tmp_path / "t", lr=float("nan")), TRAIN + ["--lr", "nan"]),
        (lambda: difflab.Trainer(preset, batch=0), TRAIN + ["--batch", "0"]),
        (lambda: difflab.train(preset, run_dir=tmp_path / "t", duration_kimg=-1), TRAIN + ["--duration", "-1"]),
        (lambda: generate(run, range(4), tmp_path / "g", steps=-5), GEN + ["--steps", "-5"]),
        (lambda: generate(run, range(4), tmp_path / "g", net_batch=0), GEN + ["--net-batch", "0"]),
        (lambda: difflab.load(run).sample(4, steps=0), GEN + ["--steps", "0"]),
        (lambda: difflab.load(run).sample(4, sigma_max=-1), GEN + ["--sigma_max", "-1"]),
        (lambda: nll(run, num=0), ["nll", "--network", run, "--num", "0"]),
    ]
    for call, argv in pairs:
        with pytest.raises(UserError) as exc:
            call()
        line = one_line_error([a.format(root=env, new=tmp_path / "new") for a in argv], capsys)
        assert line == f"difflab: error: {exc.value}"
        assert "\n" not in str(exc.value)
    assert not (tmp_path / "t").exists() and not (tmp_path / "g").exists()


def _fail(monkeypatch, target, name: str, code: int, when=lambda *a: True):
    real = getattr(target, name)

    def broken(*args, **kwargs):
        if when(*args):
            raise OSError(code, os.strerror(code), str(args[0]) if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, broken)


@pytest.mark.parametrize("where,code,words", [("replace", errno.ENOSPC, "no space left on the device"),
                                              ("mkstemp", errno.EROFS, "the file system is read-only"),
                                              ("fsync", errno.EACCES, "permission denied")])
def test_generate_when_the_disk_fails(env, tmp_path, capsys, monkeypatch, where, code, words):
    out = tmp_path / "out"
    main(["generate", "--network", str(env / "run"), "--outdir", str(out), "--seeds", "0-5", "--no-progress"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail(monkeypatch, tempfile if where == "mkstemp" else os, where, code)
    line = one_line_error(["generate", "--network", str(env / "run"), "--outdir", str(out), "--seeds", "0-5",
                           "--overwrite", "--steps", "2", "--no-progress"], capsys)
    assert words in line and str(out) in line
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every earlier file intact, no temp file


def test_training_checkpoint_on_a_full_disk_keeps_the_last_one(env, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(env / "run", run)
    kept = (run / "checkpoint-000000.safetensors").read_bytes()
    _fail(monkeypatch, os, "replace", errno.ENOSPC, when=lambda src, dst=None: "checkpoint" in Path(src).name)
    line = one_line_error(["train", "--run-dir", str(run), "--duration", "0.096", "--no-progress"], capsys)
    assert "no space left on the device" in line and str(run / "checkpoint-0000") in line
    assert (run / "checkpoint-000000.safetensors").read_bytes() == kept
    assert not list(run.glob(".*.tmp"))


def test_the_library_raises_the_same_line_on_a_full_disk(env, tmp_path, monkeypatch):
    from difflab.generate import generate

    _fail(monkeypatch, os, "replace", errno.ENOSPC)
    with pytest.raises(UserError, match="no space left on the device") as exc:
        generate(env / "run", range(2), tmp_path / "out", progress=False)
    assert str(tmp_path / "out") in str(exc.value) and "\n" not in str(exc.value)


def test_a_dead_ddp_peer_is_one_line_per_rank(env, tmp_path):
    """Rank 1 dies after joining the gloo group; rank 0's `difflab generate` ends with one line, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import os, sys
        if os.environ["RANK"] == "1":
            from difflab import distributed
            distributed.init("cpu")
            os._exit(7)
        from difflab.cli import main
        main(["generate", "--network", {str(env / "run")!r}, "--outdir", {str(tmp_path / "out")!r},
              "--no-progress", "--device", "cpu"])
    """)
    procs = []
    for rank in (0, 1):
        env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env_vars, stderr=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == 7
    err = results[0][1]
    assert procs[0].returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error: rank 0 of 2: another rank stopped"), err


@pytest.mark.parametrize("preset", ["digits-sdd", "digits-dddm"])
def test_edm_sampler_options_on_a_non_gaussian_run_are_refused(preset):
    """`--solver` / `--discretization` (EDM's ablation sampler) on an SDD or DDDM run would be ignored: refused
    in one line naming the flag; the options its sampler takes pass."""
    from difflab import make_config
    from difflab.build import build_model, resolve_image
    from difflab.errors import UserError
    from difflab.generate import check_sampler_options

    cfg = make_config(preset)
    resolve_image(cfg)
    model = build_model(cfg)
    with pytest.raises(UserError, match=r"^--solver euler: a \w+ run's sampler has no option 'solver'; it takes "):
        check_sampler_options(model, cfg.sampler, {"solver": "euler"}, {"solver": "--solver euler"})
    assert check_sampler_options(model, cfg.sampler, {"steps": 3}) == {"steps": 3}
