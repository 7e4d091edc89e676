"""The Trainer module's logic without Qt, on the headless MRML scene: command line from the parameter node,
progress lines into the loss table and the plot chart's series, a training run through the same calls the GUI's
timer makes (registering the exported package), a crashed run; plus the installed-model registry."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import textwrap
import time
import types
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "AnatomicalEmbeddingTrainer"
ADVANCED_TINY = textwrap.dedent("""\
    [train]
    log_every = 2
    num_workers = 0
    tensorboard = false
    [method]
    widths = [8, 16, 32, 64]
    feature_dim = 8
    spacing = [8.0, 8.0, 8.0]
    n_pos = 50
    n_neg = 512
    epochs_region = 0
    """)


@pytest.fixture
def trainer(monkeypatch, mrml_app, tmp_path):
    """The module imported with bare stand-ins for the GUI-side Slicer Python (as in test_mrml_bridge.py)."""
    import slicer

    from fixtures_mrml import gui_stand_ins

    for name, stand_in in gui_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    # As in Slicer, the module's folder is on sys.path (its AnatomicalEmbeddingTrainerLib); a Lib imported by an
    # earlier test holds that test's stand-ins, so it is imported afresh.
    monkeypatch.syspath_prepend(str(ROOT / MODULE))
    for name in [n for n in sys.modules if n.split(".")[0] == f"{MODULE}Lib"]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location(f"_headless_{MODULE}", ROOT / MODULE / f"{MODULE}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_params(module, **values):
    """A parameter object with the wrapper's defaults (the stand-in decorator leaves a plain class); method aefm."""
    p = module.AnatomicalEmbeddingTrainerParameterNode()
    module.AnatomicalEmbeddingTrainerLogic.setMethod(p, values.pop("method", "aefm"))
    for name in ("outputDirectory", "dataDirectory", "labelsDirectory", "runDirectory", "initFromDirectory"):
        setattr(p, name, Path("."))
    for name, value in values.items():
        setattr(p, name, value)
    return p


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from anatomical_embedding.phantoms import generate_cohort

    root = tmp_path_factory.mktemp("trainer_cohort")
    generate_cohort(root / "cohort", 3, seed=6, spacing=8.0, size=40, workers=1)
    return root / "cohort"


# ---- settings ------------------------------------------------------------------------------------
def test_gui_defaults_are_the_engine_and_method_defaults(trainer):
    """The parameter node's prefilled hyperparameters equal the config dataclasses' (paper) defaults."""
    from anatomical_embedding.methods import available_methods

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    assert logic.availableMethods() == available_methods() + ["finetune"]
    assert logic.defaultHyperparameters("finetune")["learningRate"] == 1e-4  # the finetune recipe (Adam 1e-4)
    defaults = logic.defaultHyperparameters("aefm")
    assert defaults == {"batchSize": 2, "learningRate": 1e-4, "epochs": 0, "maxSteps": 0, "maxSeconds": 0.0,
                        "patchSize": "96,96,96"}
    cls = trainer.AnatomicalEmbeddingTrainerParameterNode
    assert {k: getattr(cls, k) for k in defaults} == defaults
    p = make_params(trainer, batchSize=7, patchSize="16,16,16")
    logic.applyDefaults(p, "aefm", trainSettings=False)  # a method change refreshes only the method's settings
    assert (p.batchSize, p.patchSize) == (7, "96,96,96")
    logic.applyDefaults(p, "aefm")
    assert p.batchSize == 2


def test_finetune_command_line_from_the_parameter_node(trainer, tiny_cohort, tmp_path):
    """Finetuning from the GUI: mode and pretraining run reach train.py; no embedding package is exported."""
    spec = importlib.util.spec_from_file_location("_train_for_gui_ft", ROOT / MODULE / f"{MODULE}Lib" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    pretrained = tmp_path / "pretrain_run"
    p = make_params(trainer, method="finetune", dataDirectory=tiny_cohort, runDirectory=tmp_path / "seg",
                    initFromDirectory=pretrained, finetuneMode="backbone", patchSize="32,32,32", device="cpu")
    argv = logic.buildCommand(p)
    assert "--export" not in argv and argv[argv.index("--method") + 1] == "finetune"
    args = train.build_parser().parse_args(argv[argv.index(str(ROOT / MODULE / f"{MODULE}Lib" / "train.py")) + 1:])
    cfg = train.resolve_config(args)
    assert cfg.method == "finetune" and cfg.method_config.mode == "backbone"
    assert Path(cfg.method_config.init_from) == pretrained.resolve()
    assert cfg.method_config.patch_size == (32, 32, 32) and cfg.train.optimizer == "adam"
    assert "liver" in cfg.method_config.class_names  # segment names from the cohort's label files


def test_method_combo_is_filled_at_run_time():
    """The .ui lists no methods: the module adds the registered ones, so unimplemented methods never show."""
    root = ET.parse(ROOT / MODULE / "Resources" / "UI" / f"{MODULE}.ui").getroot()
    combo = [w for w in root.iter("widget") if w.get("name") == "methodComboBox"]
    assert len(combo) == 1 and combo[0].findall("item") == []


def test_command_line_from_the_parameter_node(trainer, tmp_path):
    """The argv the GUI launches resolves (through train.py's own parser) to the settings shown in the GUI."""
    spec = importlib.util.spec_from_file_location("_train_for_gui", ROOT / MODULE / f"{MODULE}Lib" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    p = make_params(trainer, dataDirectory=tmp_path / "data", runDirectory=tmp_path / "run", batchSize=4,
                    learningRate=3e-4, maxSteps=50, maxSeconds=600.0, patchSize="64, 64, 32", device="cpu",
                    advancedSettings="[train]\nwarmup_steps = 5\n[method]\nn_pos = 123\n")
    logic.setMethod(p, "aefm")
    argv = logic.buildCommand(p)
    script = argv.index(str(ROOT / MODULE / f"{MODULE}Lib" / "train.py"))
    args = train.build_parser().parse_args(argv[script + 1:])
    cfg = train.resolve_config(args)
    assert cfg.method == "aefm" and Path(args.data) == tmp_path / "data" and Path(args.out) == tmp_path / "run"
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.max_steps, cfg.train.device) == (4, 3e-4, 50, "cpu")
    assert cfg.train.max_seconds == 600.0
    assert cfg.train.warmup_steps == 5 and cfg.train.progress_bar is False
    assert cfg.method_config.patch_size == (64, 64, 32) and cfg.method_config.n_pos == 123
    assert Path(args.export) == tmp_path / "run" / "run.aemodel" and args.labels is None

    p.numProcesses, p.gpus, p.exportModel = 2, "0,1", False
    settings = logic.trainSettings(p)
    from anatomical_embedding.training.monitor import build_command

    argv, env = build_command(settings)
    assert argv[2:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and "--export" not in argv

    argv = logic.buildCommand(p, resume=True)
    assert "--resume" in argv and "--method" not in argv

    with pytest.raises(ValueError, match="patch size"):
        logic.buildCommand(make_params(trainer, dataDirectory=tmp_path, runDirectory=tmp_path / "r", patchSize="6a,4"))
    with pytest.raises(ValueError, match="run"):
        logic.buildCommand(make_params(trainer, dataDirectory=tmp_path))
    with pytest.raises(ValueError, match="not valid TOML"):
        logic.buildCommand(make_params(trainer, dataDirectory=tmp_path, runDirectory=tmp_path / "r",
                                       advancedSettings="[train"))
    with pytest.raises(ValueError, match="Choose a method"):
        logic.buildCommand(make_params(trainer, dataDirectory=tmp_path, runDirectory=tmp_path / "r", method=""))


def test_resume_follows_the_run_and_the_new_time_limit(trainer, tmp_path):
    """Resume takes the method of the run folder, not the combo box's (which shows the first method after a restart):
    resuming a finetune run passed --export and train.py refused it (exit 2); resuming a pretraining run while the
    combo showed "finetune" skipped the export. The time limit of the panel applies to the resumed part."""
    from anatomical_embedding.training.config import load_run_config, save_run_config

    spec = importlib.util.spec_from_file_location("_train_for_resume", ROOT / MODULE / f"{MODULE}Lib" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    logic = trainer.AnatomicalEmbeddingTrainerLogic()

    finetuneRun = tmp_path / "seg"
    finetuneRun.mkdir()
    (finetuneRun / "config.toml").write_text('method = "finetune"\n[train]\n[config]\n', encoding="utf-8")
    p = make_params(trainer, method="aefm", dataDirectory=tmp_path, runDirectory=finetuneRun, exportModel=True)
    assert logic.trainSettings(p, resume=True).export == ""
    assert "--export" not in logic.buildCommand(p, resume=True)

    run = tmp_path / "pre"
    run.mkdir()
    save_run_config(load_run_config("aefm", None, ["train.max_seconds=60.0", "train.device=\"cpu\""]),
                    run / "config.toml")
    p = make_params(trainer, method="finetune", dataDirectory=tmp_path, runDirectory=run, exportModel=True,
                    maxSeconds=0.0, device="cpu")
    settings = logic.trainSettings(p, resume=True)
    assert Path(settings.export) == run / "pre.aemodel"
    argv = logic.buildCommand(p, resume=True)
    args = train.build_parser().parse_args(argv[argv.index(str(ROOT / MODULE / f"{MODULE}Lib" / "train.py")) + 1:])
    cfg = train.resolve_config(args)
    assert args.resume and cfg.method == "aefm" and Path(args.export) == run / "pre.aemodel"
    assert cfg.train.max_seconds == 0.0  # the panel's "none", not the saved 60 s


def test_method_is_kept_in_the_scripted_module_node(trainer, mrml_scene):
    import slicer

    node = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    p = types.SimpleNamespace(parameterNode=node)
    trainer.AnatomicalEmbeddingTrainerLogic.setMethod(p, "aefm")
    assert node.GetParameter(trainer.METHOD_PARAMETER) == "aefm"
    assert trainer.AnatomicalEmbeddingTrainerLogic.getMethod(p) == "aefm"
    assert isinstance(node, slicer.vtkMRMLScriptedModuleNode)


# ---- live view ---------------------------------------------------------------------------------------
def progress(step, loss, **terms):
    return {"event": "progress", "step": step, "total_steps": 8, "epoch": step // 4, "loss": loss, "terms": terms,
            "lr": 1e-4, "samples_per_s": 3.0, "eta_s": 1.0, "gpu_mem_mb": None}


def test_progress_lines_fill_the_table_and_the_chart_series(trainer, mrml_scene):
    from anatomical_embedding.training.monitor import ProgressParser, TrainingState

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    st = TrainingState(status="running")
    lines = [{"event": "start", "total_steps": 8, "start_step": 0, "method": "aefm"},
             progress(2, 3.0, ac_local=2.0, ac_global=1.0), progress(4, 2.5, ac_local=1.5, ac_global=1.0)]
    events, _ = ProgressParser().feed("".join(json.dumps(e) + "\n" for e in lines) + "log line\n")
    for ev in events:
        st.apply(ev)
    table = logic.updateTable(mrml_scene, st.history)
    assert table.GetName() == trainer.TABLE_NAME and table.GetNumberOfRows() == 2
    # The view's header holds the column names; without it a table view shows them as row 0, one row off.
    assert table.GetUseColumnTitleAsColumnHeader()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["step", "loss", "ac_local", "ac_global"]
    vt = table.GetTable()
    assert [vt.GetValue(r, 0).ToDouble() for r in range(2)] == [2.0, 4.0]
    assert [vt.GetValue(r, names.index("ac_local")).ToDouble() for r in range(2)] == [2.0, 1.5]

    chart = mrml_scene.GetFirstNodeByName(trainer.CHART_NAME)
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert sorted(s.GetYColumnName() for s in series) == ["ac_global", "ac_local", "loss"]
    assert all(s.GetXColumnName() == "step" and s.GetTableNodeID() == table.GetID() for s in series)

    # A term that starts later (AEFM's region stage) adds a column (NaN before) and one series; no duplicates.
    st.apply(progress(6, 2.0, ac_local=1.0, ac_global=0.5, seg=0.5))
    logic.updateTable(mrml_scene, st.history)
    assert table.GetNumberOfRows() == 3 and table.GetColumnName(4) == "seg"
    assert math.isnan(table.GetTable().GetValue(0, 4).ToDouble()) and table.GetTable().GetValue(2, 4).ToDouble() == 0.5
    assert chart.GetNumberOfPlotSeriesNodes() == 4
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 4
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1

    # Resuming from the step-4 checkpoint drops the rows logged after it.
    st.apply({"event": "start", "total_steps": 8, "start_step": 4})
    logic.updateTable(mrml_scene, st.history)
    assert table.GetNumberOfRows() == 2


# ---- processes ---------------------------------------------------------------------------------------
def poll_until_done(logic, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while logic.isRunning():
        assert time.monotonic() < deadline, "training did not finish"
        logic.poll()  # what the widget's QTimer calls
        time.sleep(0.2)


@pytest.mark.slow  # a training subprocess plus ONNX export (~25 s on a shared 2-core CPU)
def test_training_through_the_logic_updates_the_table_and_registers_the_model(trainer, mrml_scene, tiny_cohort,
                                                                              tmp_path, monkeypatch):
    from anatomical_embedding.inference import registry as model_registry

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child inherits it (shared CPU)
    from anatomical_embedding.inference.backends import read_package

    registry = tmp_path / "models.json"
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=registry)
    p = make_params(trainer, dataDirectory=tiny_cohort, runDirectory=tmp_path / "tiny_run", device="cpu",
                    maxSteps=4, patchSize="32,32,32", advancedSettings=ADVANCED_TINY)
    logic.setMethod(p, "aefm")
    logic.startTraining(p)
    poll_to_end(logic)
    st = logic.monitor.state
    assert st.status == "finished", st.error
    table = logic.getTableNode(mrml_scene)
    assert table.GetNumberOfRows() == 2 and table.GetTable().GetValue(1, 0).ToDouble() == 4.0
    assert all(math.isfinite(table.GetTable().GetValue(r, 1).ToDouble()) for r in range(2))
    package = (tmp_path / "tiny_run" / "tiny_run.aemodel").resolve()
    assert logic.registeredModel["path"] == str(package)
    [entry] = model_registry.list_models(registry)
    assert entry["name"] == "tiny_run" and entry["method"] == "aefm" and Path(entry["path"]) == package
    assert read_package(entry["path"])[0]["method"] == "aefm"
    with pytest.raises(FileExistsError, match="already holds a run"):
        logic.startTraining(p)


def poll_to_end(logic, timeout: float = 300) -> None:
    """:func:`poll_until_done`, then the monitor is closed whatever happened (a run past the deadline must not
    outlive the test)."""
    try:
        poll_until_done(logic, timeout)
    finally:
        logic.monitor.close()


def run_buttons() -> types.SimpleNamespace:
    """The widgets _updateButtons writes (Qt is absent from slicer-core): buttons with enabled and toolTip."""
    ui = types.SimpleNamespace(methodComboBox=_Combo(), trainingStatusLabel=types.SimpleNamespace(text=""))
    ui.methodComboBox.addItem("aefm")
    for name in ("startButton", "stopButton", "resumeButton", "exportModelButton", "openRunFolderButton"):
        setattr(ui, name, types.SimpleNamespace(enabled=True, toolTip=f"{name} of the .ui"))
    return ui


def save_aefm_run_config(run: Path) -> None:
    """A run folder's config.toml of an AEFM run (what train.py writes at its start)."""
    from anatomical_embedding.training.config import load_run_config, save_run_config

    run.mkdir(parents=True, exist_ok=True)
    save_run_config(load_run_config("aefm", None, ['train.device="cpu"']), run / "config.toml")


def test_a_run_folder_another_process_trains_disables_start_resume_and_export(trainer, tmp_path):
    """A stopped run (checkpoints/last.pt) that another live process trains (``python train.py`` in a shell, or the
    child of a crashed Slicer: it holds RUN_DIR/train.lock): Start, Resume and Export model are refused by the
    logic's non-blocking query, with the busy message naming the process (the widget's tooltips and status show it);
    the query writes nothing, another run folder is unaffected, and all are offered again once the process has
    ended."""
    from anatomical_embedding.training.runlock import RunFolderBusy, read_owner
    from lock_holder import hold_run_folder

    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=tmp_path / "models.json")
    run = tmp_path / "run"
    save_aefm_run_config(run)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=run)
    assert logic.runFolderBusyMessage(run) is None
    free = logic.actionProblems(p)
    assert [free[k] for k in ("start", "resume", "export", "busy", "openRunFolder")] == [None] * 5
    assert free["stop"] == "Nothing is training."

    widget = trainer.AnatomicalEmbeddingTrainerWidget()
    widget.logic, widget._parameterNode, widget.ui = logic, p, run_buttons()
    widget._toolTips = {"resume": "resumeButton of the .ui", "start": "startButton of the .ui"}
    widget._busyTimer = types.SimpleNamespace(starts=0)  # Qt is absent: count what a QTimer would be asked
    widget._busyTimer.start = lambda: setattr(widget._busyTimer, "starts", widget._busyTimer.starts + 1)
    with hold_run_folder(run) as holder:
        message = logic.runFolderBusyMessage(run)
        assert message.startswith(f"{run} is being trained by process {holder.pid} (started ")
        assert message.endswith("; stop it or choose another run folder")
        problems = logic.actionProblems(p)
        assert problems["start"] == problems["resume"] == problems["export"] == problems["busy"] == message
        assert logic.exportProblem(run) == message
        assert read_owner(run)["pid"] == holder.pid  # the query left the owner's details alone
        with pytest.raises(RunFolderBusy):  # what pressing it would have done
            logic.startTraining(p, resume=True)
        with pytest.raises(RuntimeError, match="is being trained by process"):
            logic.startExport(run)
        assert logic.actionProblems(make_params(trainer, runDirectory=tmp_path / "other"))["start"] is None

        widget._updateButtons()
        ui = widget.ui
        assert not ui.resumeButton.enabled and not ui.startButton.enabled and not ui.exportModelButton.enabled
        assert ui.resumeButton.toolTip == ui.exportModelButton.toolTip == message
        assert ui.trainingStatusLabel.text == message and ui.openRunFolderButton.enabled
        assert widget._busyTimer.starts == 1  # the panel asks again soon, without any setting changing
    assert logic.runFolderBusyMessage(run) is None and logic.actionProblems(p)["resume"] is None
    widget._updateButtons()  # what that timer calls
    assert widget._busyTimer.starts == 1  # free again: no more asking
    assert ui.resumeButton.enabled and ui.exportModelButton.enabled
    assert ui.resumeButton.toolTip == "resumeButton of the .ui"
    assert ui.trainingStatusLabel.text == ""
    assert logic.monitor is None  # nothing was launched


# ---- Export model (defect: a stopped run, or one trained without "export when finished", could not be exported) ----
def test_export_model_needs_a_checkpoint_a_pretraining_run_and_asks_before_replacing(trainer, tmp_path):
    """Export model is offered for a run folder with a checkpoint of a pretraining method only (a finetune run is a
    segmenter, as train.py refuses --export for it); an existing package is never replaced without asking: the
    logic refuses with one line naming the file and the fix, before launching anything."""
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=tmp_path / "models.json")
    run = tmp_path / "run"
    save_aefm_run_config(run)
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=run)
    assert logic.exportProblem("") == "Choose the run folder."
    assert logic.exportProblem(run) == logic.actionProblems(p)["export"] == f"{run} has no checkpoint to export."
    with pytest.raises(RuntimeError, match="has no checkpoint to export"):
        logic.startExport(run)

    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    assert logic.exportProblem(run) is None
    package = logic.exportPath(run)
    package.write_bytes(b"an earlier export")
    with pytest.raises(FileExistsError) as err:
        logic.startExport(run)
    assert str(err.value) == f"{package} exists; delete or rename it, or allow replacing it, then export again."
    assert package.read_bytes() == b"an earlier export" and logic.monitor is None  # nothing launched

    finetune = tmp_path / "seg"
    (finetune / "checkpoints").mkdir(parents=True)
    (finetune / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    (finetune / "config.toml").write_text('method = "finetune"\n[train]\n[config]\n', encoding="utf-8")
    assert "apply it with `anatomical-embedding segment --run RUN_DIR`" in logic.exportProblem(finetune)
    with pytest.raises(RuntimeError, match="not an embedding model package"):
        logic.startExport(finetune)


def test_export_model_of_a_damaged_checkpoint_fails_with_a_clear_status_and_no_package(trainer, mrml_scene, tmp_path):
    """The export runs in a child process (train.py --export-only); one that fails reports why in the status, leaves
    no package, registers nothing and leaves the run folder free."""
    from anatomical_embedding.inference import registry as model_registry

    registry = tmp_path / "models.json"
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=registry)
    run = tmp_path / "run"
    save_aefm_run_config(run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"cut short by a full disk")
    logic.startExport(run)
    assert logic.isExporting() and logic.exportStatus().startswith(f"Exporting {logic.exportPath(run)}")
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=run)
    assert logic.actionProblems(p)["resume"] == "A model export is running; wait for it to end."
    poll_to_end(logic, timeout=120)
    st = logic.monitor.state
    assert st.status == "failed" and st.returncode == 2, st.error
    assert logic.exportStatus().startswith("Export failed (exit code 2: bad input") and "last.pt" in st.error
    assert not logic.exportPath(run).exists() and logic.registeredModel is None
    assert model_registry.list_models(registry, include_missing=True) == []
    assert logic.runFolderBusyMessage(run) is None and logic.exportProblem(run) is None


@pytest.mark.slow  # a training subprocess, then two export subprocesses (ONNX export and parity check)
def test_export_model_of_a_run_trained_without_export_registers_a_verified_package(trainer, mrml_scene, tiny_cohort,
                                                                                    tmp_path, monkeypatch):
    """A run trained without "export when finished" is exported with Export model: the package exists, passes the
    package verification, was exported from the run's last step and is registered under the run's name; a second
    export refuses to replace it, and replaces it when allowed (the widget asked)."""
    from anatomical_embedding.inference import registry as model_registry
    from anatomical_embedding.inference.backends import read_package

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children inherit it (shared CPU)
    registry = tmp_path / "models.json"
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=registry)
    run = tmp_path / "tiny_run"
    p = make_params(trainer, dataDirectory=tiny_cohort, runDirectory=run, device="cpu", maxSteps=2,
                    patchSize="32,32,32", advancedSettings=ADVANCED_TINY, exportModel=False)
    logic.startTraining(p)
    poll_to_end(logic)
    assert logic.monitor.state.status == "finished", logic.monitor.state.error
    package = logic.exportPath(run)
    assert not package.exists() and logic.registeredModel is None and logic.actionProblems(p)["export"] is None

    logic.startExport(run)
    assert logic.isExporting() and logic.actionProblems(p)["export"] == "A model export is running; wait for it to end."
    poll_to_end(logic)
    st = logic.monitor.state
    assert st.status == "finished", st.error
    assert Path(st.exported) == package and package.is_file()
    card, members = read_package(package)  # hashes, integrity record and the .sha256 sidecar
    assert card["method"] == "aefm" and card["step"] == 2 and "model.onnx" in members
    [entry] = model_registry.list_models(registry)
    assert (entry["name"], Path(entry["path"])) == ("tiny_run", package.resolve())
    assert logic.registeredModel["path"] == entry["path"]
    assert logic.exportStatus() == f"Exported {package}; model registered: {entry['path']}"
    assert logic.runFolderBusyMessage(run) is None  # the export's lock went with its process

    exported = package.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="exists; delete or rename it, or allow replacing it"):
        logic.startExport(run)
    assert package.stat().st_mtime_ns == exported and not logic.isRunning()
    logic.startExport(run, overwrite=True)  # the user said yes to replacing it
    poll_to_end(logic)
    assert logic.monitor.state.status == "finished", logic.monitor.state.error
    assert package.stat().st_mtime_ns != exported and read_package(package)[0]["step"] == 2
    assert len(model_registry.list_models(registry)) == 1  # registered again, not twice


FAKE_CRASH = """
import json, pathlib, sys
args = sys.argv[1:]
export = pathlib.Path(args[args.index("--export") + 1])
print(json.dumps({"event": "start", "total_steps": 10, "start_step": 0}), flush=True)
print(json.dumps({"event": "progress", "step": 2, "total_steps": 10, "epoch": 0, "loss": 1.5,
                  "terms": {"ac_local": 1.0}}), flush=True)
(export.parent / ("." + export.stem + ".tmp1.aemodel")).write_bytes(b"half")  # an export cut short
print("Segmentation fault in a worker", file=sys.stderr, flush=True)
sys.exit(139)
"""


def test_crashed_training_gives_a_clear_error_and_no_package(trainer, mrml_scene, tmp_path):
    from anatomical_embedding.inference import registry as model_registry

    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(FAKE_CRASH), encoding="utf-8")
    registry = tmp_path / "models.json"
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=registry)
    run = tmp_path / "crash_run"
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=run)
    logic.setMethod(p, "aefm")
    settings = dataclasses.replace(logic.trainSettings(p), script=str(script), python=sys.executable)
    logic.startTraining(p, settings=settings)
    poll_until_done(logic, timeout=60)
    st = logic.monitor.state
    assert st.status == "failed" and st.returncode == 139
    assert st.error == "training failed (exit code 139: killed or crashed): Segmentation fault in a worker"
    assert logic.getTableNode(mrml_scene).GetNumberOfRows() == 1  # the curve up to the crash stays visible
    assert sorted(f.name for f in run.iterdir()) == ["console.log"]  # no package, no partial export
    assert logic.registeredModel is None and model_registry.list_models(registry, include_missing=True) == []


FAKE_HUNG = """
import json, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a step that never ends: neither the signal nor the stop file helps
print(json.dumps({"event": "start", "total_steps": 10, "start_step": 0}), flush=True)
print(json.dumps({"event": "progress", "step": 2, "total_steps": 10, "epoch": 0, "loss": 1.5, "terms": {}}),
      flush=True)
time.sleep(600)
"""


def test_second_stop_ends_a_hung_run_at_once(trainer, mrml_scene, tmp_path):
    """Stop asks for a checkpoint at the end of the step; a run that never gets there (a hung data loader or GPU) is
    ended by pressing Stop again (force), and reads "stopped", not "failed"."""
    script = tmp_path / "hung.py"
    script.write_text(textwrap.dedent(FAKE_HUNG), encoding="utf-8")
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=tmp_path / "models.json")
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=tmp_path / "run", exportModel=False)
    settings = dataclasses.replace(logic.trainSettings(p), script=str(script), python=sys.executable)
    logic.startTraining(p, settings=settings)
    try:
        deadline = time.monotonic() + 30
        while not logic.monitor.state.history and time.monotonic() < deadline:
            logic.poll()
            time.sleep(0.1)
        logic.stopTraining()
        time.sleep(1.0)
        logic.poll()
        assert logic.isRunning() and logic.isStopping()
        logic.stopTraining(force=logic.isStopping())  # what the widget's second press does
        assert not logic.isRunning()
        st = logic.monitor.state
        assert st.status == "stopped" and st.error == ""
        assert logic.getTableNode(mrml_scene).GetNumberOfRows() == 1
    finally:
        logic.monitor.close()


FAKE_PACED = """
import json, pathlib, sys, time
run = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
print(json.dumps({"event": "start", "total_steps": 6, "start_step": 0}), flush=True)
for step in (2, 4, 6):
    while not (run / f"go{step}").exists():  # the test paces the run
        time.sleep(0.05)
    print(json.dumps({"event": "progress", "step": step, "total_steps": 6, "epoch": 0, "loss": 1.0 / step,
                      "terms": {"a": 0.5 / step}}), flush=True)
"""


def test_scene_close_detaches_the_live_view_and_training_goes_on(trainer, mrml_scene, tmp_path):
    """Closing the scene while a run trains: the loss table and chart are not re-created in the next scene by the
    following polls (they were, and were saved with it); the run and its status go on; opening the module panel
    again (reattachLiveView) shows the whole curve again; a run that has ended is not brought back."""
    script = tmp_path / "paced.py"
    script.write_text(textwrap.dedent(FAKE_PACED), encoding="utf-8")
    run = tmp_path / "run"
    logic = trainer.AnatomicalEmbeddingTrainerLogic(registryPath=tmp_path / "models.json")
    p = make_params(trainer, dataDirectory=tmp_path, runDirectory=run, exportModel=False)
    settings = dataclasses.replace(logic.trainSettings(p), script=str(script), python=sys.executable)

    def step_to(step: int) -> None:
        (run / f"go{step}").touch()
        deadline = time.monotonic() + 30
        while logic.monitor.state.step < step:
            assert time.monotonic() < deadline, list(logic.monitor.state.log_lines)
            logic.poll()  # what the widget's timer does
            time.sleep(0.05)

    def live_view_nodes() -> list:
        return [mrml_scene.GetNumberOfNodesByClass(c)
                for c in ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")]

    logic.startTraining(p, settings=settings)
    try:
        step_to(2)
        assert logic.getTableNode(mrml_scene).GetNumberOfRows() == 1 and live_view_nodes() == [1, 1, 2]
        mrml_scene.Clear(0)  # File > Close Scene
        step_to(4)
        assert live_view_nodes() == [0, 0, 0]  # nothing re-created in the new scene
        assert logic.isRunning() and not logic.isLiveViewAttached()
        assert logic.monitor.state.summary().startswith("running: step 4/6")  # the panel's status goes on

        assert logic.reattachLiveView()  # the module panel is shown again
        assert logic.getTableNode(mrml_scene).GetNumberOfRows() == 2 and live_view_nodes() == [1, 1, 2]
        assert not logic.reattachLiveView()  # already attached
        step_to(6)
        poll_until_done(logic, timeout=30)
        assert logic.monitor.state.status == "finished"
        assert logic.getTableNode(mrml_scene).GetNumberOfRows() == 3

        mrml_scene.Clear(0)
        assert not logic.reattachLiveView() and live_view_nodes() == [0, 0, 0]  # an ended run stays closed
    finally:
        logic.monitor.close()


# ---- a labelled case exported from the scene (defect: a new image beside an old or missing label) ----------
def case_nodes(scene):
    """A small volume node and a two-segment segmentation node on it."""
    import numpy as np

    from anatomical_embedding import io, mrml

    image = io.Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), [1.0, 1.5, 2.0], [3, -2, 7], np.eye(3))
    labels = np.zeros(image.array.shape, np.uint8)
    labels[1:4, 2:5, 2:6], labels[4:6, 0:3, 0:3] = 1, 2
    return (mrml.volume_to_node(image, scene, "scan"),
            mrml.labelmap_to_segmentation_node(image.with_array(labels), {1: "liver", 2: "spleen"}, scene, "organs"),
            labels)


def files_in(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden temporaries included), as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_export_case_refuses_any_existing_file_of_the_case_before_writing(trainer, mrml_scene, tmp_path):
    """An existing label of the case (no image yet) refuses the export at once with one message, and nothing is
    written: the engine pairs images and labels by name, so a new image must not land beside an old label. With
    overwrite the case is replaced as a whole, including a label the new export has none for."""
    from anatomical_embedding.data.datasets import DatasetSpec
    from anatomical_embedding.io.labelmaps import read_labelmap

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    volume, segmentation, labels = case_nodes(mrml_scene)
    folder = tmp_path / "train"
    (folder / "labels").mkdir(parents=True)
    (folder / "labels" / "case_001.nii.gz").write_bytes(b"an older label map")
    for seg in (segmentation, None):
        with pytest.raises(FileExistsError) as err:
            logic.exportCase(volume, seg, folder, "case_001")
        assert str(err.value) == (f"case 'case_001' exists in {folder} (labels/case_001.nii.gz); choose another "
                                  "case name or allow overwriting")
        assert files_in(folder) == ["labels/case_001.nii.gz"]
    assert (folder / "labels" / "case_001.nii.gz").read_bytes() == b"an older label map"

    paths = logic.exportCase(volume, segmentation, folder, "case_001", overwrite=True)
    assert files_in(folder) == ["images/case_001.nii.gz", "labels/case_001.labels.json", "labels/case_001.nii.gz"]
    label, names = read_labelmap(paths["label"])
    assert (label.array == labels).all() and names == {1: "liver", 2: "spleen"}
    logic.exportCase(volume, None, folder, "case_001", overwrite=True)
    assert files_in(folder) == ["images/case_001.nii.gz"]
    assert [(c.id, c.label) for c in DatasetSpec.from_path(folder).cases] == [("case_001", None)]


def test_export_case_failure_leaves_none_of_the_new_files(trainer, mrml_scene, tmp_path, monkeypatch):
    """A failure while the case is written leaves neither the image nor the label (nor a temporary file): a "labels"
    that is a file, and a disk error while the label map is written (injected into its writer)."""
    from anatomical_embedding.io import labelmaps

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    volume, segmentation, _ = case_nodes(mrml_scene)
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "labels").write_text("a file where the labels folder goes", encoding="utf-8")
    with pytest.raises(FileExistsError):
        logic.exportCase(volume, segmentation, folder, "case_001")
    assert files_in(folder) == ["labels"]

    def disk_full(label, names, path, overwrite=False, colors=None):
        Path(path).write_bytes(b"half a label map")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(labelmaps, "write_labelmap", disk_full)
    folder = tmp_path / "train2"
    with pytest.raises(OSError, match="No space left on device"):
        logic.exportCase(volume, segmentation, folder, "case_001")
    assert files_in(folder) == []


def test_use_training_folder_with_an_empty_labels_folder_trains_without_labels(trainer, mrml_scene, tmp_path):
    """"Use training folder" on a folder whose labels/ holds no label map (made by the user, or emptied): the
    command pairs images/ and labels/ through the engine (no --labels), and the engine reads the cases as unlabelled
    instead of failing with "no label maps found" (pretraining needs no labels)."""
    from anatomical_embedding.data.datasets import DatasetSpec

    logic = trainer.AnatomicalEmbeddingTrainerLogic()
    volume, _, _ = case_nodes(mrml_scene)
    folder = tmp_path / "train"
    logic.exportCase(volume, None, folder, "case_001")
    (folder / "labels").mkdir()
    p = make_params(trainer, outputDirectory=folder, runDirectory=tmp_path / "run", device="cpu")
    widget = trainer.AnatomicalEmbeddingTrainerWidget()
    widget._parameterNode = p
    widget.onUseTrainingFolder()  # the button's own handler: data = the folder, labels "." (paired by the engine)
    argv = logic.buildCommand(p)
    assert "--labels" not in argv
    spec = importlib.util.spec_from_file_location("_train_for_labels", ROOT / MODULE / f"{MODULE}Lib" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = train.build_parser().parse_args(argv[argv.index(str(ROOT / MODULE / f"{MODULE}Lib" / "train.py")) + 1:])
    data = DatasetSpec.from_path(args.data, args.labels)  # what the engine's Trainer reads (train.py passes both)
    assert [(c.id, c.label) for c in data.cases] == [("case_001", None)]


# ---- model registry ------------------------------------------------------------------------------------
def fake_package(path: Path, method: str = "aefm") -> Path:
    """A structurally valid package (card hashes match its members); the registry does not run ONNX."""
    from anatomical_embedding.inference.backends import CARD_NAME, ONNX_NAME, sha256_bytes

    onnx = b"not really onnx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(CARD_NAME, json.dumps({"method": method, "onnx_sha256": sha256_bytes(onnx)}))
        zf.writestr(ONNX_NAME, onnx)
    return path


def test_model_registry_register_list_unregister(tmp_path, monkeypatch):
    from anatomical_embedding.inference import registry as model_registry

    monkeypatch.setenv(model_registry.ENV_VAR, str(tmp_path / "reg" / "models.json"))
    assert model_registry.registry_path() == tmp_path / "reg" / "models.json"
    a, b = fake_package(tmp_path / "a.aemodel"), fake_package(tmp_path / "b.aemodel", "hdssl")
    model_registry.register_model(a, run_dir=tmp_path)
    model_registry.register_model(b, name="bee")
    model_registry.register_model(a)  # re-registering refreshes, never duplicates
    assert [(m["name"], m["method"]) for m in model_registry.list_models()] == [("bee", "hdssl"), ("a", "aefm")]
    b.unlink()
    assert [m["name"] for m in model_registry.list_models()] == ["a"]  # missing files are not offered
    assert len(model_registry.list_models(include_missing=True)) == 2
    assert model_registry.unregister_model(b) and not model_registry.unregister_model(b)

    broken = tmp_path / "broken.aemodel"
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="not a valid model package"):
        model_registry.register_model(broken)
    with pytest.raises(FileNotFoundError):
        model_registry.register_model(tmp_path / "missing.aemodel")
    (tmp_path / "reg" / "models.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_registry.list_models()


def test_defaults_read_from_source_equal_the_imported_dataclasses(trainer):
    """The torch-free reading of the method defaults (ast) agrees with the imported Config classes: every
    field with a literal default is found and equal, and patch_size (what the panel shows) is always there."""
    from AnatomicalEmbeddingTrainerLib import settings

    for method in settings.availableMethods():
        imported = settings.methodConfigDefaults(method)
        parsed = settings.dataclassDefaultsFromSource(*settings.methodTarget(method))
        assert parsed and {k: imported[k] for k in parsed} == parsed, method
        assert ("patch_size" in parsed) == ("patch_size" in imported), method
    train = settings.dataclassDefaultsFromSource("anatomical_embedding.training.config", "TrainConfig")
    assert train == settings.trainConfigDefaults()


# ---- the panel without PyTorch (defect: setup() imported methods/adam.py and therefore torch) -------------
class _Combo:
    def __init__(self):
        self.items, self.currentText = [], ""

    def addItem(self, text):
        self.items.append(text)
        self.currentText = self.currentText or text

    @property
    def count(self):
        return len(self.items)

    def setCurrentText(self, text):
        self.currentText = text

    def connect(self, *args):
        pass


def test_trainer_panel_opens_without_torch_and_offers_the_install(trainer, mrml_scene, monkeypatch):
    """The Widget's real setup() with torch and MONAI imports blocked: the method list and the method's defaults
    are filled (read torch-free), the status names the missing packages, and Start asks once before installing.

    Qt is absent from slicer-core, so the .ui's widgets are mocks; the module, logic and settings are the real ones.
    """
    import unittest.mock as mock

    import slicer

    for name in list(sys.modules):
        top = name.split(".")[0]
        if top in ("torch", "monai") or name.startswith(("anatomical_embedding.methods.", "anatomical_embedding.training",
                                                         "anatomical_embedding.nets", "anatomical_embedding.losses")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, find_spec says absent
    monkeypatch.setitem(sys.modules, "monai", None)
    qt = types.ModuleType("qt")
    qt.QTimer = mock.MagicMock
    monkeypatch.setitem(sys.modules, "qt", qt)
    ui = types.SimpleNamespace(methodComboBox=_Combo(), trainingStatusLabel=types.SimpleNamespace(text=""))
    for name in ("exportCaseButton", "useTrainingFolderButton", "resetDefaultsButton", "startButton", "stopButton",
                 "resumeButton", "exportModelButton", "openRunFolderButton", "logTextEdit"):
        setattr(ui, name, mock.MagicMock())
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(trainer.ScriptedLoadableModuleWidget, "setup", lambda self: None, raising=False)
    p = make_params(trainer, method="", patchSize="", trainingVolume=None, caseName="case", batchSize=0)
    p.connectGui = lambda ui: "tag"
    p.disconnectGui = lambda tag: None
    p.AddObserver = lambda event, method, priority=0.0: 1  # what VTKObservationMixin calls on the wrapper's node
    p.RemoveObserver = lambda tag: None
    monkeypatch.setattr(trainer.AnatomicalEmbeddingTrainerLogic, "getParameterNode", lambda self: p)

    widget = trainer.AnatomicalEmbeddingTrainerWidget()
    widget.layout, widget.parent = mock.MagicMock(), mock.MagicMock()
    widget.resourcePath = lambda rel: str(ROOT / MODULE / "Resources" / rel)
    widget.setup()

    from anatomical_embedding.methods import available_methods

    assert ui.methodComboBox.items == available_methods() + ["finetune"]
    assert (p.method, p.patchSize) == ("adam", "") or p.patchSize  # the first method's defaults were applied
    widget.onMethodChanged("aefm")
    assert p.patchSize == "96,96,96"  # AEFM's default, read from the source without torch
    assert "torch" in ui.trainingStatusLabel.text and "Start installs" in ui.trainingStatusLabel.text
    assert sys.modules["torch"] is None  # nothing imported torch behind the block

    asked, shown = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text: asked.append(text) or False,
                        raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append(text), raising=False)
    monkeypatch.setattr(slicer, "packaging", None, raising=False)
    widget.onStart()
    assert len(asked) == 1 and "PyTorch" in asked[0]  # one prompt, naming PyTorch
    assert shown and "declined" in shown[0]  # the user sees why nothing started
    assert widget.logic.monitor is None  # nothing launched
    widget.removeObservers()
