"""The engine's layering (ARCHITECTURE.md): imports go downward only, with no cycles, and the ONNX path
imports without torch or MONAI. Reads the source with ``ast``, so lazy (function-level) imports count too."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / "AnatomicalEmbedding" / "anatomical_embedding"
PKG = "anatomical_embedding"

#: Rooms from the ground floor up; a module may import its own room and the rooms below it.
LAYERS: tuple[str, ...] = ("io", "phantoms", "data", "nets", "losses", "methods", "training", "inference",
                           "fewshot", "evaluation", "cli", "mrml")

#: What Slicer's viewer and `fewshot apply`/`match` on an .aemodel import: never torch or MONAI.
TORCH_FREE = ("inference.backends", "inference.embedding", "inference.feature_registration", "inference.matching",
              "inference.prior",
              "inference.precision", "inference.registry", "fewshot.head", "mrml", "cli.app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """Engine modules that ``name`` imports (absolute names), with line numbers."""
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PKG:
                continue
            # `from pkg import submodule` imports the submodule; `from mod import name` imports mod
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out += [(s, node.lineno) for s in subs] or [(mod, node.lineno)]
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_room_is_known():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms <= set(LAYERS), f"modules outside the documented rooms: {sorted(rooms - set(LAYERS))}"


def test_no_upward_import():
    upward = []
    for mod, targets in _graph().items():
        src = _room(mod)
        if src is None:
            continue
        for target, line in targets:
            dst = _room(target)
            if dst is not None and LAYERS.index(dst) > LAYERS.index(src):
                upward.append(f"{mod}:{line} imports {target} ({src} -> {dst})")
    assert not upward, "upward imports (see ARCHITECTURE.md):\n" + "\n".join(upward)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = {m: sorted({t for t, _ in ts if t != m}) for m, ts in _graph().items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
    probe = tmp_path / "probe.py"
    probe.write_text(f"def f():\n    from {PKG}.inference.backends import OnnxModel\nfrom {PKG}.io import images\n")
    known = {f"{PKG}.io", f"{PKG}.io.images", f"{PKG}.inference.backends"}
    got = _imports(f"{PKG}.io.probe", probe, known)
    assert (f"{PKG}.inference.backends", 2) in got  # a lazy import counts
    assert (f"{PKG}.io.images", 3) in got  # `from package import submodule` names the submodule
    assert LAYERS.index(_room(f"{PKG}.inference.backends")) > LAYERS.index(_room(f"{PKG}.io.probe"))


@pytest.mark.parametrize("module", TORCH_FREE)
def test_onnx_path_imports_without_torch_or_monai(module):
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'monai'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib; m = importlib.import_module('{PKG}.{module}')\n"
        "if m.__name__.endswith('cli.app'): m.build_parser()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


_MODULE_LOAD = r'''
import importlib.abc, importlib.util, sys, tempfile, time, types
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path.insert(0, "Testing")
from fixtures_mrml import bootstrap_headless_slicer, gui_stand_ins
app = bootstrap_headless_slicer(tempfile.mkdtemp())
import slicer
sys.modules.update(gui_stand_ins())
slicer.app = types.SimpleNamespace(temporaryPath=tempfile.mkdtemp())
t1 = time.perf_counter()
for module in ("AnatomicalEmbedding", "AnatomicalEmbeddingTrainer"):
    sys.path.insert(0, module)
    spec = importlib.util.spec_from_file_location(f"_headless_{module}", f"{module}/{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    getattr(mod, f"{module}Logic")()
print(f"LOADED {time.perf_counter() - t1:.3f}")
'''


def test_slicer_modules_load_without_torch_or_monai():
    """Issue 22: loading the viewer and trainer modules (Module file, Lib, Logic) on slicer-core never imports
    torch or MONAI, so Slicer's start-up does not pay for them (measured: 0.16 s for both)."""
    res = subprocess.run([sys.executable, "-c", _MODULE_LOAD], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "LOADED" in res.stdout, res.stderr[-2000:]
