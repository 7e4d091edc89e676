"""The Slicer extension's build files match what is on disk.

Slicer scripted modules list every script and resource explicitly in their CMakeLists.txt; a file
that is missing there is silently left out of the built extension. These tests compare the lists
with the files and, on failure, print the exact lines to add or remove.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["AnatomicalEmbedding", "AnatomicalEmbeddingTrainer"]
#: Folders inside a module that are not part of the built module.
SKIP_DIRS = {"Testing", "__pycache__"}
#: Source-checkout-only files, deliberately not installed: the old ``AnatomicalEmbeddingTrainer/train.py`` path is a
#: compatibility launcher for the documented command; installed, Slicer would load it as a module.
NOT_INSTALLED = {"AnatomicalEmbeddingTrainer": {"train.py"}}


def cmake_text(path: Path) -> str:
    """CMake source without comments (a '#' outside quotes starts a comment)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        out, quoted = [], False
        for ch in line:
            if ch == '"':
                quoted = not quoted
            if ch == "#" and not quoted:
                break
            out.append(ch)
        lines.append("".join(out))
    return "\n".join(lines)


def cmake_calls(text: str, command: str) -> list[list[str]]:
    """Arguments of every ``command(...)`` call (whitespace-separated, quotes removed)."""
    calls = []
    for m in re.finditer(rf"\b{command}\s*\(([^)]*)\)", text, flags=re.IGNORECASE):
        args = re.findall(r'"[^"]*"|[^\s"]+', m.group(1))
        calls.append([a[1:-1] if a.startswith('"') else a for a in args])
    return calls


def cmake_set(text: str, variable: str) -> list[str] | None:
    for args in cmake_calls(text, "set"):
        if args and args[0] == variable:
            return args[1:]
    return None


def module_files(module_dir: Path) -> tuple[set[str], set[str]]:
    """(scripts, resources) of a module folder, as paths relative to it.

    Scripts: every ``*.py`` outside Testing/ and __pycache__ (the module file, the engine package,
    train.py ...). Resources: every file under Resources/, plus non-Python data files inside
    Python packages (e.g. the engine's configs), which must be installed next to the scripts.
    """
    scripts, resources = set(), set()
    for path in module_dir.rglob("*"):
        rel = path.relative_to(module_dir)
        if not path.is_file() or SKIP_DIRS & set(rel.parts) or any(p.startswith(".") for p in rel.parts):
            continue
        if any(p.endswith(".egg-info") for p in rel.parts) or path.suffix == ".pyc":
            continue
        if path.suffix == ".py":
            scripts.add(rel.as_posix())
        elif rel.parts[0] == "Resources" or (len(rel.parts) > 1 and (module_dir / rel.parts[0] / "__init__.py").is_file()):
            resources.add(rel.as_posix())
    return scripts, resources


def listed(module_dir: Path, variable: str) -> set[str]:
    text = cmake_text(module_dir / "CMakeLists.txt")
    values = cmake_set(text, variable)
    assert values is not None, f"{module_dir.name}/CMakeLists.txt does not set {variable}"
    name = cmake_set(text, "MODULE_NAME")
    return {v.replace("${MODULE_NAME}", name[0] if name else "${MODULE_NAME}") for v in values}


def diff_message(module: str, variable: str, on_disk: set[str], in_cmake: set[str]) -> str:
    missing, stale = sorted(on_disk - in_cmake), sorted(in_cmake - on_disk)
    parts = [f"{module}/CMakeLists.txt {variable} does not match the files on disk."]
    if missing:
        parts.append("Add these lines:\n" + "\n".join(f"  {m}" for m in missing))
    if stale:
        parts.append("Remove these lines (no such file):\n" + "\n".join(f"  {s}" for s in stale))
    return "\n".join(parts)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


# ---- top level --------------------------------------------------------------------------------
def test_top_level_cmake_is_a_slicer_extension():
    text = cmake_text(ROOT / "CMakeLists.txt")
    assert cmake_calls(text, "cmake_minimum_required"), "cmake_minimum_required(...) missing"
    assert ["AnatomicalEmbedding"] in cmake_calls(text, "project")
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake_set(text, f"EXTENSION_{var}") is not None, f"EXTENSION_{var} is not set"
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert cmake_set(text, f"EXTENSION_{var}") != [""], f"EXTENSION_{var} is empty"
    assert cmake_set(text, "EXTENSION_DEPENDS") == ["NA"], "the PyTorch extension must stay optional"
    assert cmake_set(text, "EXTENSION_ICONURL")[0].endswith("/Resources/Icons/AnatomicalEmbedding.png")

    order = [m.group(0) for m in re.finditer(
        r"find_package\(\s*Slicer\s+REQUIRED\s*\)|include\(\s*\$\{Slicer_USE_FILE\}\s*\)|add_subdirectory\([^)]*\)"
        r"|include\(\s*\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\s*\)|include\(\s*\$\{Slicer_EXTENSION_CPACK\}\s*\)", text)]
    kinds = ["find" if o.startswith("find") else "use" if "USE_FILE" in o else "sub" if o.startswith("add")
             else "config" if "GENERATE_CONFIG" in o else "cpack" for o in order]
    assert kinds == ["find", "use"] + ["sub"] * len(MODULES) + ["config", "cpack"], order
    assert [a[0] for a in cmake_calls(text, "add_subdirectory")] == MODULES


def test_every_module_folder_is_built():
    """Each folder that holds <Name>/<Name>.py is a module and is added to the extension."""
    found = sorted(p.parent.name for p in ROOT.glob("*/*.py") if p.stem == p.parent.name)
    assert found == sorted(MODULES)


def test_extension_icon_and_license():
    assert png_size(ROOT / "Resources" / "Icons" / "AnatomicalEmbedding.png") == (128, 128)
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not just a notice


# ---- modules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_the_scripted_module(module):
    module_dir = ROOT / module
    text = cmake_text(module_dir / "CMakeLists.txt")
    assert cmake_set(text, "MODULE_NAME") == [module]
    (call,) = cmake_calls(text, "slicerMacroBuildScriptedModule")
    assert call[call.index("NAME") + 1] == "${MODULE_NAME}"
    assert "${MODULE_PYTHON_SCRIPTS}" in call and "${MODULE_PYTHON_RESOURCES}" in call
    assert "WITH_GENERIC_TESTS" in call
    assert re.search(r"if\s*\(\s*BUILD_TESTING\s*\)[^$]*?add_subdirectory\(\s*Testing\s*\)", text, flags=re.S)
    testing = cmake_text(module_dir / "Testing" / "CMakeLists.txt")
    assert ["Python"] in cmake_calls(testing, "add_subdirectory")
    python = cmake_text(module_dir / "Testing" / "Python" / "CMakeLists.txt")
    scripts = [a[a.index("SCRIPT") + 1] for a in cmake_calls(python, "slicer_add_python_unittest")]
    assert scripts, f"{module}/Testing/Python/CMakeLists.txt registers no Slicer self test"
    resolved = [(module_dir / "Testing" / "Python" / s.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
                 .replace("${MODULE_NAME}", module)).resolve() for s in scripts]
    assert (module_dir / f"{module}.py").resolve() in resolved


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_script(module):
    module_dir = ROOT / module
    on_disk, _ = module_files(module_dir)
    on_disk -= NOT_INSTALLED.get(module, set())
    in_cmake = listed(module_dir, "MODULE_PYTHON_SCRIPTS")
    assert on_disk == in_cmake, diff_message(module, "MODULE_PYTHON_SCRIPTS", on_disk, in_cmake)


@pytest.mark.parametrize("module", MODULES)
def test_only_the_module_file_is_installed_at_the_top_of_the_module_folder(module):
    """Slicer loads every installed top-level ``.py`` of a scripted-module folder as a module; anything but the
    module file logs "class ... was not found" at every start (it did for train.py)."""
    top = {s for s in listed(ROOT / module, "MODULE_PYTHON_SCRIPTS") if "/" not in s}
    assert top == {f"{module}.py"}, f"{module}/CMakeLists.txt installs top-level scripts {sorted(top)}"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_resource(module):
    module_dir = ROOT / module
    _, on_disk = module_files(module_dir)
    in_cmake = listed(module_dir, "MODULE_PYTHON_RESOURCES")
    assert on_disk == in_cmake, diff_message(module, "MODULE_PYTHON_RESOURCES", on_disk, in_cmake)


@pytest.mark.parametrize("module", MODULES)
def test_module_has_ui_icon_and_tests(module):
    module_dir = ROOT / module
    assert (module_dir / "Resources" / "UI" / f"{module}.ui").is_file()
    assert png_size(module_dir / "Resources" / "Icons" / f"{module}.png") == (128, 128)
    assert (module_dir / "Testing" / "Python").is_dir()


def test_engine_package_is_part_of_the_viewer_module():
    scripts = listed(ROOT / "AnatomicalEmbedding", "MODULE_PYTHON_SCRIPTS")
    assert "anatomical_embedding/__init__.py" in scripts
    assert "anatomical_embedding/mrml.py" in scripts


def test_layout_checker_reports_missing_and_stale_entries(tmp_path):
    """The checker itself: a module folder with one unlisted and one stale entry."""
    module = tmp_path / "Mod"
    (module / "pkg").mkdir(parents=True)
    (module / "Resources" / "UI").mkdir(parents=True)
    (module / "Testing" / "Python").mkdir(parents=True)
    for rel in ("Mod.py", "pkg/__init__.py", "pkg/new.py", "pkg/data.toml", "Resources/UI/Mod.ui",
                "Testing/Python/ignored.py"):
        (module / rel).write_text("", encoding="utf-8")
    (module / "CMakeLists.txt").write_text(
        "set(MODULE_NAME Mod)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py  # the module\n"
        "  pkg/__init__.py\n  pkg/gone.py\n  )\nset(MODULE_PYTHON_RESOURCES\n  Resources/UI/${MODULE_NAME}.ui\n  )\n", encoding="utf-8")
    scripts, resources = module_files(module)
    assert scripts == {"Mod.py", "pkg/__init__.py", "pkg/new.py"}
    assert resources == {"Resources/UI/Mod.ui", "pkg/data.toml"}
    message = diff_message("Mod", "MODULE_PYTHON_SCRIPTS", scripts, listed(module, "MODULE_PYTHON_SCRIPTS"))
    assert "Add these lines:\n  pkg/new.py" in message
    assert "Remove these lines (no such file):\n  pkg/gone.py" in message
