"""The modules' Qt Designer files agree with the module code.

The module .py files import Slicer's GUI (not available here), so they are read with ``ast``, not
imported: the widgets the code uses (``self.ui.<name>``) must exist in the .ui, every widget bound
to the parameter node (dynamic property ``SlicerParameterName``) must name a field of the
``@parameterNodeWrapper`` class with a widget type that can show that field, and node selectors
must receive the scene.
"""
from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["AnatomicalEmbedding", "AnatomicalEmbeddingTrainer"]

#: Parameter-node fields that the module writes itself and no widget shows: the heatmap is the module's output
#: (hidden from node selectors, so a selector could never show it, and a user scan picked there was overwritten).
MODULE_OUTPUT_FIELDS = {"AnatomicalEmbedding": {"heatmapVolume"}}

#: Widget classes that can show a field, by the field's type (as written in the annotation); these
#: are the exact classes Slicer's parameterNodeWrapper GUI connectors accept (guiConnectors.py).
WIDGETS_FOR_TYPE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QComboBox", "QTextEdit"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}
#: Widgets whose connector refuses an unbounded number (it needs WithinRange).
NEEDS_RANGE = {"QSlider", "ctkSliderWidget"}
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox",
              "QLineEdit", "QProgressBar", "QTableWidget", "QTextEdit", "QPlainTextEdit", "QGroupBox",
              "QSlider", "QRadioButton", "QToolButton", "QFrame", "QTabWidget", "QScrollArea"}


# ---- reading the .ui ------------------------------------------------------------------------
def ui_tree(module: str) -> ET.Element:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


def widgets(root: ET.Element) -> dict[str, ET.Element]:
    found: dict[str, ET.Element] = {}
    for w in root.iter("widget"):
        name = w.get("name")
        assert name not in found, f"widget name {name!r} is used twice"
        found[name] = w
    return found


def prop(widget: ET.Element, name: str) -> ET.Element | None:
    for p in widget.findall("property"):
        if p.get("name") == name:
            return p
    return None


def string_list(p: ET.Element | None) -> list[str]:
    return [] if p is None else [s.text or "" for s in p.iter("string")]


def combo_items(widget: ET.Element) -> list[str]:
    return [string_list(prop(item, "text"))[0] for item in widget.findall("item")]


# ---- reading the module code ----------------------------------------------------------------
def module_ast(module: str) -> ast.Module:
    return ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))


def ui_attributes(tree: ast.Module) -> set[str]:
    """Names used as ``<anything>.ui.<name>`` (``self.ui.applyButton``, ``widget.ui.x``)."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}


def module_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level ``NAME = <literal>`` assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def parameter_fields(tree: ast.Module) -> dict[str, dict]:
    """Fields of the ``@parameterNodeWrapper`` class: {name: {"type", "choices" (list or None), "bounded"}}."""
    constants = module_constants(tree)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(d) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(classes) == 1, "expected exactly one @parameterNodeWrapper class"
    fields = {}
    for node in classes[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        ann, choices, bounded = node.annotation, None, False
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            base, *extras = ann.slice.elts
            for extra in extras:
                if isinstance(extra, ast.Call) and ast.unparse(extra.func) == "Choice":
                    arg = extra.args[0]
                    choices = constants[arg.id] if isinstance(arg, ast.Name) else ast.literal_eval(arg)
                if isinstance(extra, ast.Call) and ast.unparse(extra.func) == "WithinRange":
                    bounded = True
            ann = base
        fields[node.target.id] = {"type": ast.unparse(ann), "choices": choices, "bounded": bounded}
    return fields


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_with_module_widget_on_top(module):
    root = ui_tree(module)
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module
    widgets(root)  # names unique


def overlapping_cells(root: ET.Element) -> list[str]:
    """Items of one grid or form layout that claim the same cell: Qt keeps the first and leaves the other
    widget out of the layout (a form row that never shows)."""
    clashes = []
    for layout in root.iter("layout"):
        if layout.get("class") not in ("QGridLayout", "QFormLayout"):
            continue
        taken: dict[tuple[int, int], str] = {}
        for item in layout.findall("item"):
            if item.get("row") is None:
                continue
            child = next((c for c in item if c.tag in ("widget", "layout", "spacer")), None)
            name = child.get("name", "?") if child is not None else "?"
            row, col = int(item.get("row")), int(item.get("column", 0))
            for r in range(row, row + int(item.get("rowspan", 1))):
                for c in range(col, col + int(item.get("colspan", 1))):
                    if (r, c) in taken:
                        clashes.append(f"{layout.get('name')}: {name} and {taken[(r, c)]} both at row {r}, column {c}")
                    taken.setdefault((r, c), name)
    return clashes


@pytest.mark.parametrize("module", MODULES)
def test_layout_cells_are_not_shared(module):
    assert overlapping_cells(ui_tree(module)) == []


@pytest.mark.parametrize("module", MODULES)
def test_custom_widgets_are_declared(module):
    root = ui_tree(module)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    undeclared = sorted(c for c in used - QT_CLASSES if c.startswith(("ctk", "qMRML", "qSlicer")) and c not in declared)
    assert not undeclared, f"{module}.ui uses custom widgets without a <customwidget> entry: {undeclared}"


@pytest.mark.parametrize("module", MODULES)
def test_widgets_used_by_the_code_exist(module):
    names = set(widgets(ui_tree(module)))
    used = ui_attributes(module_ast(module))
    assert used, f"{module}.py uses no widget from its .ui"
    assert used <= names, f"{module}.py uses widgets missing from {module}.ui: {sorted(used - names)}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_bindings_match_the_wrapper(module):
    fields = parameter_fields(module_ast(module))
    bound: dict[str, ET.Element] = {}
    for name, w in widgets(ui_tree(module)).items():
        p = prop(w, "SlicerParameterName")
        if p is None:
            continue
        field = string_list(p)[0]
        assert field in fields, f"{module}.ui widget {name!r} is bound to {field!r}, not a field of {sorted(fields)}"
        assert field not in bound, f"field {field!r} is bound to two widgets"
        bound[field] = w
    assert bound, f"{module}.ui binds no widget to the parameter node"
    for field, w in bound.items():
        ftype, cls = fields[field]["type"], w.get("class")
        if ftype.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", f"{field}: node field shown by {cls}"
            assert string_list(prop(w, "nodeTypes")) == [ftype], f"{field}: selector node types differ from {ftype}"
        else:
            assert cls in WIDGETS_FOR_TYPE[ftype], f"{field} ({ftype}) cannot be shown by {cls}"
        if cls in NEEDS_RANGE:
            assert fields[field]["bounded"], f"{field}: {cls} needs a WithinRange annotation"
        if cls == "QComboBox":
            assert fields[field]["choices"] is not None, f"{field}: a combo box needs a Choice annotation"
        if fields[field]["choices"] is not None:
            assert cls == "QComboBox" and combo_items(w) == list(fields[field]["choices"]), \
                f"{field}: combo box items {combo_items(w)} differ from Choice {fields[field]['choices']}"


@pytest.mark.parametrize("module", MODULES)
def test_every_field_has_a_widget(module):
    fields = parameter_fields(module_ast(module))
    bound = {string_list(prop(w, "SlicerParameterName"))[0] for w in widgets(ui_tree(module)).values()
             if prop(w, "SlicerParameterName") is not None}
    shown = set(fields) - MODULE_OUTPUT_FIELDS.get(module, set())
    assert shown == bound, f"fields without a widget: {sorted(shown - bound)}"


@pytest.mark.parametrize("module", MODULES)
def test_node_selectors_receive_the_scene(module):
    root = ui_tree(module)
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == module and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, w in widgets(root).items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors <= receivers, f"node selectors without the scene: {sorted(selectors - receivers)}"
    names = set(widgets(root))
    for c in root.iter("connection"):
        assert c.findtext("sender") in names and c.findtext("receiver") in names


@pytest.mark.parametrize("module", MODULES)
def test_every_button_does_something(module):
    """No dead buttons: each push button is bound to a parameter or used by the code."""
    used = ui_attributes(module_ast(module))
    for name, w in widgets(ui_tree(module)).items():
        if w.get("class") == "QPushButton" and prop(w, "SlicerParameterName") is None:
            assert name in used, f"{module}.ui button {name!r} is not connected to anything"


def module_classes(module: str) -> dict[str, list[str]]:
    """{class name: base names} of the module file, plus the classes it imports from its ``<module>Lib`` package
    (Slicer looks the Logic up in the module file; it may be defined in the Lib and imported there)."""
    tree = module_ast(module)
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == f"{module}Lib":
            lib = ast.parse((ROOT / module / f"{node.module.replace('.', '/')}.py").read_text(encoding="utf-8"))
            defined = {n.name: [ast.unparse(b) for b in n.bases] for n in lib.body if isinstance(n, ast.ClassDef)}
            classes.update({a.asname or a.name: defined[a.name] for a in node.names if a.name in defined})
    return classes


@pytest.mark.parametrize("module", MODULES)
def test_module_defines_widget_logic_and_self_test(module):
    classes = module_classes(module)
    assert classes[module] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes[f"{module}Widget"]
    assert classes[f"{module}Logic"] == ["ScriptedLoadableModuleLogic"]
    assert classes[f"{module}Test"] == ["ScriptedLoadableModuleTest"]


def test_checker_catches_a_wrong_binding(tmp_path, monkeypatch):
    """The parameter checks fail on a .ui bound to an unknown field and on mismatched choices."""
    module = "Mod"
    (tmp_path / module / "Resources" / "UI").mkdir(parents=True)
    (tmp_path / module / f"{module}.py").write_text(
        "MODES = ['a', 'b']\n@parameterNodeWrapper\nclass P:\n    mode: Annotated[str, Choice(MODES)] = 'a'\n", encoding="utf-8")
    (tmp_path / module / "Resources" / "UI" / f"{module}.ui").write_text(
        '<ui version="4.0"><widget class="qMRMLWidget" name="Mod">'
        '<widget class="QComboBox" name="modeComboBox"><property name="SlicerParameterName" stdset="0">'
        '<string>mode</string></property><item><property name="text"><string>a</string></property></item>'
        '</widget><widget class="QLineEdit" name="other"><property name="SlicerParameterName" stdset="0">'
        '<string>typo</string></property></widget></widget></ui>', encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert parameter_fields(module_ast(module)) == {"mode": {"type": "str", "choices": ["a", "b"], "bounded": False}}
    with pytest.raises(AssertionError, match="typo"):
        test_parameter_bindings_match_the_wrapper(module)
    ui = tmp_path / module / "Resources" / "UI" / f"{module}.ui"
    ui.write_text(ui.read_text(encoding="utf-8").replace("<string>typo</string>", "<string>mode</string>"))
    with pytest.raises(AssertionError, match="bound to two widgets"):
        test_parameter_bindings_match_the_wrapper(module)
    ui.write_text(ui.read_text(encoding="utf-8").replace('name="other"', 'name="x"').split('<widget class="QLineEdit"')[0]
                  + "</widget></ui>")
    with pytest.raises(AssertionError, match="differ from Choice"):
        test_parameter_bindings_match_the_wrapper(module)
