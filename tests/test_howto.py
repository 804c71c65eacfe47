"""The how-tos of docs/howto/ (one per system difflab replaces) run as written.

A fenced block whose first line is ``# cpu-test writes: PATH ...`` (bash or python) is its page's CPU-sized
version: it runs in a fresh directory, with ``difflab`` and ``python`` on PATH resolving to this checkout,
must exit 0 and leave every listed path (globs allowed). Every ``difflab ...`` command the pages show,
in code blocks and in table cells alike, must parse with today's CLI.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "docs" / "howto"
MARK = re.compile(r"^# cpu-test writes:(.*)$")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
SLOW: set[str] = set()  # pages whose CPU version takes longer than ~30 s (marked slow)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of a Markdown file, fences paired correctly."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def cpu_blocks() -> list[tuple[str, int, str, str, list[str]]]:
    out = []
    for page in sorted(HOWTO.glob("*.md")):
        for i, (lang, body) in enumerate(fenced_blocks(page)):
            first = body.splitlines()[0] if body else ""
            if m := MARK.match(first):
                out.append((page.name, i, lang, body, m.group(1).split()))
    return out


def _params():
    for page, i, lang, body, writes in cpu_blocks():
        marks = [pytest.mark.slow] if page in SLOW else []
        yield pytest.param(page, lang, body, writes, id=f"{page}-{i}-{lang}", marks=marks)


def _env(tmp_path: Path) -> dict[str, str]:
    """PATH with `difflab` and `python` shims for this checkout's code and interpreter."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for name, cmd in (("difflab", f'"{sys.executable}" -m difflab'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg", WANDB_SILENT="true")
    env.pop("DIFFLAB_LOG_LEVEL", None)
    return env


def test_every_page_has_a_cpu_version():
    """Each system's page (all pages but the index) carries at least one CPU-sized block."""
    pages = {p.name for p in HOWTO.glob("*.md")} - {"README.md", "own-data.md"}
    assert {"sdd.md", "ddpm-cifar.md", "dddm.md", "score-sde.md", "ddpm-mnist.md"} <= pages
    with_cpu = {page for page, *_ in cpu_blocks()}
    assert pages <= with_cpu, f"no '# cpu-test writes:' block in {sorted(pages - with_cpu)}"
    for page, _, lang, _, writes in cpu_blocks():
        assert lang in ("bash", "python") and writes, f"{page}: a cpu block must be bash/python and name its files"


def test_index_links_every_page():
    index = (HOWTO / "README.md").read_text()
    for page in HOWTO.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/howto/README.md does not link {page.name}"
    assert "(../zoo.md)" in index


@pytest.mark.parametrize("page,lang,body,writes", list(_params()))
def test_cpu_version_runs(tmp_path, page, lang, body, writes):
    """The block exits 0 and writes what its first line says (and nothing it lists is there before)."""
    assert not any(glob.glob(str(tmp_path / w)) for w in writes)
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", body]
    else:
        (tmp_path / "howto_block.py").write_text(body)
        cmd = [sys.executable, "howto_block.py"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    assert res.returncode == 0, f"{page} ({took:.0f} s):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    missing = [w for w in writes if not glob.glob(str(tmp_path / w))]
    assert not missing, f"{page}: the block did not write {missing}"
    print(f"{page} {lang}: {took:.1f} s")


def _howto_commands() -> list[tuple[str, str]]:
    """Every `difflab <command> ...` of the pages and the zoo: lines of bash blocks and backticked spans in table
    rows."""
    cmds = []
    pattern = re.compile(r"(?:^|[\s`]|-m )difflab ((?:train|generate|fid|nll|dataset|info|report)\b.*)")
    for page in [*sorted(HOWTO.glob("*.md")), ROOT / "docs" / "zoo.md"]:
        text = page.read_text()
        for lang, body in fenced_blocks(page):
            if lang in ("bash", "sh", ""):
                for line in body.replace("\\\n", " ").splitlines():
                    if m := pattern.search(line.split(" #")[0]):
                        cmds.append((page.name, m.group(1).split("&&")[0].split("|")[0].split(";")[0].strip()))
        rows = [line for line in FENCE.sub("", text).splitlines() if line.startswith("|")]
        for span in re.findall(r"`([^`\n]*)`", "\n".join(rows)):  # the table cells: side-by-side equivalents
            if m := pattern.search(span):
                cmds.append((page.name, m.group(1)))
    return cmds


def test_every_howto_command_parses(tmp_path, monkeypatch):
    """The difflab side of every table row parses (train commands also build their config), so each
    spelling a page promises is a real flag."""
    from difflab.cli import build_parser
    from difflab.cli.train import config_from_args
    from difflab.config import load_preset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-config.json").write_text(json.dumps(load_preset("digits-quick").to_dict()))
    cmds = _howto_commands()
    assert len(cmds) > 60
    for where, cmd in cmds:
        argv = [a.replace("$RUN", "runs/x").replace("$c", "3") for a in shlex.split(cmd)]
        args, extra = build_parser().parse_known_args(argv)
        if argv[0] == "train" and not args.resume:
            config_from_args(args, extra)
        else:
            assert not extra, f"{where}: difflab {cmd}: unknown {extra}"


def test_one_number_is_a_one_element_list_option(tmp_path, monkeypatch):
    """`--attn-resolutions 16` (DDPM-CIFAR's one attention resolution) is the list [16], as 16,8 is [16, 8]."""
    from difflab.cli import build_parser
    from difflab.cli.train import config_from_args

    monkeypatch.chdir(tmp_path)
    for text, want in (("16", [16]), ("16,8", [16, 8])):
        args, extra = build_parser().parse_known_args(["train", "--preset", "cifar10-ddpm", "--attn-resolutions", text])
        assert config_from_args(args, extra).network["attn_resolutions"] == want
