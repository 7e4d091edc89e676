"""Headless MRML scene fixture (see conftest.py).

slicer-core ships the real MRML classes and module logics, but nothing that a Slicer application
would set up at start-up. ``mrml_app`` does that once per session, mirroring what
``qSlicerCoreApplication`` and the loadable modules' ``setup()`` do:

* a ``vtkMRMLScene`` with a ``vtkCacheManager`` and a ``vtkDataIOManager`` (storage nodes ask the
  scene for them);
* a ``vtkSlicerApplicationLogic`` on that scene, whose ``vtkMRMLColorLogic`` adds the built-in
  colour tables (Grey, Labels, procedural tables ...). slicer-core ships no colour *files*, so
  file-based tables such as ``GenericAnatomyColors`` do not exist (``vtkSlicerColorLogic`` would
  look for them under a Slicer home directory and log an error); labelmaps use the built-in
  default, and the MRML bridge brings its own colour table anyway;
* the segmentation converter rules (binary labelmap <-> closed surface), which Slicer's
  Segmentations module registers in ``setup()``;
* Volumes, Segmentations, Markups and Subject Hierarchy logics on the scene (they register their
  node classes, e.g. ``vtkMRMLSegmentationNode``, ``vtkMRMLMarkupsFiducialNode``);
* ``slicer.mrmlScene`` and a ``slicer.modules.<name>.logic()`` namespace, so ``slicer.util``
  helpers (``addVolumeFromArray``, ``updateSegmentBinaryLabelmapFromArray`` ...) work as in Slicer.

VTK warnings and errors go to a string output window; tests can read and reset them through
``mrml_app.vtk_messages()`` to prove an operation ran cleanly.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import pytest


@dataclass
class HeadlessSlicer:
    """What a Slicer application would hold: the scene, application logic and module logics."""

    scene: object
    app_logic: object
    logics: dict[str, object]
    output_window: object
    saved_attrs: dict[str, object] = field(default_factory=dict)
    read_upto: int = 0

    def vtk_messages(self, reset: bool = True) -> str:
        """VTK warning/error text printed since the last reset."""
        # vtkStringOutputWindow only appends, so remember how much was already read.
        text = self.output_window.GetOutput() or ""
        new = text[self.read_upto:]
        if reset:
            self.read_upto = len(text)
        return new

    def new_scene_state(self) -> None:
        """Clear the scene to the state of a freshly started Slicer (default colour nodes kept)."""
        import slicer

        self.scene.Clear(0)  # 0: keep singletons (colour tables, selection and interaction nodes)
        slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(self.scene)


_MARKER = object()  # "attribute was absent" (None is a valid value)


def bootstrap_headless_slicer(cache_dir: str) -> HeadlessSlicer:
    import slicer
    import vtk

    output_window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(output_window)

    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(cache_dir)
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)

    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # No views headless, but several logics iterate over these collections.
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    if scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0:
        color_logic.AddDefaultColorNodes()

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    # The factory is a process-wide singleton: register each rule once, as Slicer's module setup does.
    have = {(r.GetSourceRepresentationName(), r.GetTargetRepresentationName()) for r in factory.GetConverterRules()}
    for rule_class in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                       slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        rule = rule_class()
        if (rule.GetSourceRepresentationName(), rule.GetTargetRepresentationName()) not in have:
            factory.RegisterConverterRule(rule)

    logics: dict[str, object] = {}
    for key, cls in (("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                     ("volumes", slicer.vtkSlicerVolumesLogic),
                     ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                     ("markups", slicer.vtkSlicerMarkupsLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logics[key] = logic
    # Logics look each other up by module name through the application logic, as in Slicer.
    for module_name, key in (("SubjectHierarchy", "subjecthierarchy"), ("Volumes", "volumes"),
                             ("Segmentations", "segmentations"), ("Markups", "markups")):
        app_logic.SetModuleLogic(module_name, logics[key])
    # The Volumes logic colours new label maps through the "Colors" module logic.
    app_logic.SetModuleLogic("Colors", color_logic)

    saved = {name: getattr(slicer, name, _MARKER) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{key: types.SimpleNamespace(logic=(lambda lg=logic: lg)) for key, logic in logics.items()})
    return HeadlessSlicer(scene, app_logic, logics, output_window, saved)



def gui_stand_ins() -> dict:
    """Bare stand-ins for the GUI-side Slicer Python that slicer-core lacks, by module name: the parameter node
    wrapper decorator (and its annotations) and the ``ScriptedLoadableModule`` base classes. Only these imports are
    replaced; a module's Logic then runs unchanged on the real MRML scene."""
    import types

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Base,), {}))
    return {"slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted}


def teardown_headless_slicer(app: HeadlessSlicer) -> None:
    import slicer
    import vtk

    app.scene.Clear(1)
    for name, value in app.saved_attrs.items():
        if value is _MARKER:
            if hasattr(slicer, name):
                delattr(slicer, name)
        else:
            setattr(slicer, name, value)
    vtk.vtkOutputWindow.SetInstance(None)


@pytest.fixture(scope="session")
def mrml_app(tmp_path_factory):
    """Session-wide headless Slicer core (scene, logics, ``slicer.mrmlScene``); see module doc."""
    app = bootstrap_headless_slicer(str(tmp_path_factory.mktemp("slicer-cache")))
    yield app
    teardown_headless_slicer(app)


@pytest.fixture
def mrml_scene(mrml_app):
    """The scene, cleared to a fresh start for each test (``slicer.mrmlScene`` is this scene)."""
    import slicer

    mrml_app.new_scene_state()
    slicer.mrmlScene = mrml_app.scene
    mrml_app.vtk_messages(reset=True)
    yield mrml_app.scene
    mrml_app.new_scene_state()
