"""The package layout (issue 13): no import cycle, every module imports on its own, old module paths still
import, and the public API does not depend on what was imported before it."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from tests.test_train import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "difflab"
# old path -> new module (difflab._compat aliases; see the modules' __init__)
MOVED = {"difflab.train.loop": "difflab.training.loop", "difflab.train.ema": "difflab.training.ema",
         "difflab.train.logging": "difflab.training.logging", "difflab.train.checkpoint": "difflab.runio.checkpoints",
         "difflab.train.distributed": "difflab.distributed", "difflab.train.cli": "difflab.cli.train",
         "difflab.generate_cli": "difflab.cli.generate", "difflab.info_cli": "difflab.cli.info",
         "difflab.nll_cli": "difflab.cli.nll", "difflab.metrics.cli": "difflab.cli.fid",
         "difflab.data.cli": "difflab.cli.dataset", "difflab.metrics.lpips": "difflab.nets.lpips"}


def all_modules() -> list[str]:
    return sorted(["difflab"] + [m.name for m in pkgutil.walk_packages([str(PKG)], "difflab.")])


def import_graph() -> dict[str, set[str]]:
    """module -> the difflab modules it imports anywhere in its text (function-level imports included)."""
    files = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {r for n in names if n.startswith("difflab") and (r := resolve(n)) not in (None, mod)}
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages():
    """The units of DESIGN.md's layout (difflab.generate, difflab.training, difflab.metrics, ...) form no cycle
    either: generation no longer reaches into training, nor metrics.fid into metrics.sources and back."""
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        unit = ".".join(mod.split(".")[:2])
        graph.setdefault(unit, set()).update(".".join(d.split(".")[:2]) for d in deps)
        graph[unit].discard(unit)
    assert cycles(graph) == []


def test_every_module_imports_alone():
    """Each module (and each old path) is imported first in its own child of one interpreter that has loaded
    the third-party libraries but no difflab module, so an import cycle or an order dependence shows."""
    names = all_modules() + sorted(MOVED)
    script = textwrap.dedent("""
        import importlib, json, os, sys, warnings
        import numpy, scipy.linalg, torch, PIL.Image, safetensors.torch, tqdm.auto  # noqa: F401
        assert not [m for m in sys.modules if m.startswith("difflab")]
        failed = {}
        for name in json.loads(sys.argv[1]):
            pid = os.fork()
            if pid == 0:
                try:
                    warnings.simplefilter("ignore", DeprecationWarning)
                    importlib.import_module(name)
                    os._exit(0)
                except BaseException as e:
                    print(name, repr(e), flush=True)
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            if status:
                failed[name] = status
        print(json.dumps(failed))
    """)
    res = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {}, res.stdout


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    for name in all_modules() + sorted(MOVED):
        res = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", f"import {name}"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 0, f"{name}: {res.stderr[-1000:]}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_are_the_new_modules(old):
    import importlib

    with pytest.warns(DeprecationWarning, match=re.escape(MOVED[old])) if old not in sys.modules else \
            warnings.catch_warnings():
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the alias did not relabel the real module


def test_old_names_still_import():
    from difflab.cli.train import config_from_args  # noqa: F401
    from difflab.generate import load_run  # noqa: F401
    from difflab.metrics.fid import FeatureStats, Progress, dataset_ref_stats  # noqa: F401
    from difflab.training.loop import read_stats  # noqa: F401
    from difflab.utils import atomic_write_bytes, atomic_write_text, npz_bytes, remove_stale_temps  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from difflab.metrics import cli as metrics_cli
        from difflab.train.checkpoint import list_checkpoints, read_checkpoint, resolve_checkpoint  # noqa: F401
        from difflab.train.distributed import all_reduce_sum, barrier, init  # noqa: F401
    assert callable(metrics_cli._make_detector)


def test_no_second_copy_of_the_shared_helpers():
    """One atomic writer, one process-group init, one progress bar (issue 13 item 2): nothing else in the
    package calls the primitives they wrap (read from the code's tokens, so docstrings do not count)."""
    import io
    import tokenize

    owners = {"mkstemp": "runio/files.py", "mkdtemp": "runio/files.py", "fsync": "runio/files.py",
              "os . replace": "runio/files.py", "os . rename": "runio/files.py",
              "init_process_group": "distributed.py", "tqdm (": "distributed.py"}
    for path in PKG.rglob("*.py"):
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        code = " ".join(t.string for t in tokens if t.type in (tokenize.NAME, tokenize.OP))
        for needle, owner in owners.items():
            where = path.relative_to(PKG).as_posix()
            assert needle not in code or where == owner, f"{where} calls {needle}"


def test_train_is_the_function_whatever_was_imported(tmp_path):
    """`import difflab.train.loop` (the old path) binds the package to `difflab.train`: the package forwards
    calls to difflab.api.train, so difflab.train(...) works before and after, and around a CLI call."""
    import inspect

    import difflab.cli
    from difflab.api import train as api_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import difflab.train.loop  # noqa: F401
    assert callable(difflab.train)
    assert inspect.signature(difflab.train) == inspect.signature(api_train)
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(tiny_cfg().to_dict()))
    first = difflab.train(str(preset), run_dir=tmp_path / "a", progress=False)
    difflab.cli.main(["train", "--preset", str(preset), "--run-dir", str(tmp_path / "b"), "--no-progress"])
    second = difflab.train(str(preset), run_dir=tmp_path / "c", progress=False)
    for run in (first, second, tmp_path / "b"):
        assert (run / "checkpoint-000000.json").is_file()


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"### Python\n\n```python\n(.*?)```", text, re.S).group(1)


def _run_after_importing_everything(code: str, cwd: Path) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import importlib, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in {all_modules() + sorted(MOVED)!r}:
            importlib.import_module(name)
    """)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1200)


@pytest.mark.slow
def test_readme_python_snippet_verbatim(tmp_path):
    """The README's snippet as it stands (digits-quick, 20 kimg: ~30 s on 2 CPU cores), in one process after
    importing every difflab module, old paths included."""
    res = _run_after_importing_everything(readme_python(), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "runs" / "dq" / "training_options.json").is_file()


def test_readme_python_snippet_on_a_tiny_preset(tmp_path):
    """The same snippet with only the preset name and the duration swapped for a tiny run (fast suite)."""
    code = readme_python()
    assert code.count('"digits-quick"') == 1 and code.count("duration_kimg=20") == 1
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_cfg().to_dict()))
    code = code.replace('"digits-quick"', '"tiny.json"').replace("duration_kimg=20", "duration_kimg=0.048")
    res = _run_after_importing_everything(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file()


def documented_commands() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(whole commands in the docs' code blocks, inline `difflab ...` fragments of their prose)."""
    whole, inline = [], []
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "examples" / "quickstart.sh"]
    pattern = r"(?:^|\s|-m )difflab ((?:train|generate|fid|nll|dataset|info)\b.*)"
    for f in files:
        text = f.read_text()
        fences = re.findall(r"```([^\n`]*)\n(.*?)```", text, re.S)  # every fence, whatever its language
        blocks = [b for lang, b in fences if lang.strip() in ("", "bash", "sh", "console")] \
            if f.suffix == ".md" else [text]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if m := re.search(pattern, line.split(" #")[0]):
                    whole.append((f.name, m.group(1).split("&&")[0].split("|")[0].strip()))
        inline += [(f.name, m) for m in re.findall(r"`difflab ((?:train|generate|fid|nll|dataset|info)\b[^`]*)`", text)]
    return whole, inline


def test_every_documented_command_parses(tmp_path, monkeypatch):
    """Every `difflab ...` command of README.md, docs/ and examples/ still parses (and a train command still
    builds its config), so no documented flag spelling was lost in the move to derived flags."""
    import shlex

    from difflab.cli import build_parser
    from difflab.cli.train import config_from_args
    from difflab.config import load_preset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-config.json").write_text(json.dumps(load_preset("digits-quick").to_dict()))
    whole, _ = documented_commands()
    assert len(whole) > 40
    for where, cmd in whole:
        argv = shlex.split(cmd)
        args, extra = build_parser().parse_known_args(argv)
        if argv[0] == "train" and not args.resume:
            config_from_args(args, extra)
        else:
            assert not extra, f"{where}: {cmd}: {extra}"


def test_every_documented_flag_is_known():
    """The flags named in the docs' prose (`difflab train --lossType ...`) are flags of that command, or, for
    train, options of some method or network (routed by name)."""
    import argparse

    from difflab.build import named_parameters
    from difflab.cli import build_parser
    from difflab.cli.options import snake
    from difflab.methods.registry import METHODS, method_class
    from difflab.nets import NETWORKS

    def flags_of(parser: argparse.ArgumentParser) -> set[str]:
        out = set()
        for action in parser._actions:
            out |= set(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out |= flags_of(sub)
        return out

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    routed = set().union(*(named_parameters(method_class(m).__init__) for m in METHODS),
                         *(named_parameters(s.factory) for s in NETWORKS.values()))
    whole, inline = documented_commands()
    for where, cmd in whole + inline:
        command = cmd.split()[0]
        for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", cmd):
            known = flag in flags_of(subs[command]) or (command == "train" and snake(flag[2:]) in routed)
            assert known or flag in ("--some-option", "--option-name"), f"{where}: `difflab {cmd}`: {flag}"
