"""Training settings from the Trainer's parameter node: method, key hyperparameters and the train.py command."""
from __future__ import annotations

import pathlib
from dataclasses import fields

import slicer

#: The method is not a parameterNodeWrapper field: the registered methods are only known at run time, while a
#: Choice needs a fixed list. It is kept as a plain parameter of the same parameter node.
METHOD_PARAMETER = "Method"
#: Parameter-node field -> engine setting, for the key hyperparameters shown in the GUI.
TRAIN_FIELDS = {"batchSize": "batch_size", "learningRate": "lr", "epochs": "epochs", "maxSteps": "max_steps",
                "maxSeconds": "max_seconds"}
#: The training entry point, run as a subprocess (it stays next to the module file).
TRAIN_SCRIPT = pathlib.Path(__file__).resolve().parent / "train.py"


def pathOrEmpty(value) -> str:
    """A pathlib.Path field that was never set reads as "."; treat it as empty."""
    text = str(value) if value is not None else ""
    return "" if text in ("", ".") else text


def availableMethods() -> list:
    """Pretraining methods, then the finetune task (segmentation from a pretrained run)."""
    from anatomical_embedding.methods import available_methods, available_tasks

    return available_methods() + available_tasks()


def getMethod(p) -> str:
    node = getattr(p, "parameterNode", None)
    if node is not None:
        return node.GetParameter(METHOD_PARAMETER) or ""
    return getattr(p, "method", "")  # plain objects (scripts, tests)


def setMethod(p, method: str) -> None:
    node = getattr(p, "parameterNode", None)
    if node is not None:
        node.SetParameter(METHOD_PARAMETER, method)
    else:
        p.method = method


def torchAvailable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def dataclassDefaultsFromSource(moduleName: str, className: str) -> dict:
    """Literal defaults of a dataclass read from its module's source with ``ast`` (no import: no torch).

    Fields whose default is not a literal are left out; base classes in the same module are merged.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec(moduleName, "anatomical_embedding.methods")
    tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    configAlias = next((item.value.id for item in getattr(classes.get(className), "body", [])
                        if isinstance(item, ast.Assign) and isinstance(item.value, ast.Name)
                        and any(isinstance(t, ast.Name) and t.id == "Config" for t in item.targets)), None)

    def literal(value):
        try:
            return True, ast.literal_eval(value)
        except ValueError:
            pass
        if isinstance(value, ast.Call):  # field(default=...) / field(default_factory=lambda: ...) / ranged(default, lo, hi)
            if isinstance(value.func, ast.Name) and value.func.id == "ranged" and value.args:
                try:
                    return True, ast.literal_eval(value.args[0])
                except ValueError:
                    return False, None
            for kw in value.keywords:
                inner = kw.value.body if kw.arg == "default_factory" and isinstance(kw.value, ast.Lambda) else \
                    kw.value if kw.arg == "default" else None
                if inner is not None:
                    try:
                        return True, ast.literal_eval(inner)
                    except ValueError:
                        return False, None
        return False, None

    def collect(name: str, out: dict) -> dict:
        node = classes.get(name)
        if node is None:
            return out
        for base in node.bases:  # dataclass inheritance within the module
            if isinstance(base, ast.Name):
                collect(base.id, out)
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                ok, value = literal(item.value)
                if ok:
                    out[item.target.id] = value
        return out

    return collect(configAlias or className, {})


def methodConfigDefaults(method: str) -> dict:
    """Defaults of the method's ``Config`` dataclass, without importing torch when it is absent.

    With torch importable the class is imported (exact). Without it (a fresh Slicer: the Trainer panel must still
    open and offer the install), the method's source is read with ``ast``.
    """
    if torchAvailable():
        from anatomical_embedding.methods import get_method

        return {f.name: f.default for f in fields(get_method(method).Config)}
    return dataclassDefaultsFromSource(*methodTarget(method))


def methodTarget(method: str) -> tuple:
    """(module, class) of a registered method, without importing it."""
    from anatomical_embedding import methods

    target = methods._REGISTRY.get(method) or methods._TASKS.get(method)
    if target is None:
        raise ValueError(f"unknown method {method!r}")
    module, cls = target.split(":")
    return module, cls


def finetuneTrainDefaults() -> tuple:
    """``FINETUNE_TRAIN_DEFAULTS`` of the engine (read from its source when torch is absent)."""
    if torchAvailable():
        from anatomical_embedding.training.finetune_config import FINETUNE_TRAIN_DEFAULTS

        return tuple(FINETUNE_TRAIN_DEFAULTS)
    import ast
    import importlib.util

    spec = importlib.util.find_spec("anatomical_embedding.training.finetune_config")
    for node in ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       else None)
        if isinstance(target, ast.Name) and target.id == "FINETUNE_TRAIN_DEFAULTS":
            return tuple(ast.literal_eval(node.value))
    return ()


def trainConfigDefaults() -> dict:
    if torchAvailable():
        from anatomical_embedding.training.config import TrainConfig

        return {f.name: f.default for f in fields(TrainConfig)}
    return dataclassDefaultsFromSource("anatomical_embedding.training.config", "TrainConfig")


def defaultHyperparameters(method: str) -> dict:
    """The key hyperparameters' defaults (paper values) from the engine and the method's Config dataclass."""
    train = trainConfigDefaults()
    if method == "finetune":  # the finetune command's recipe (Adam, lr 1e-4), not the pretraining defaults
        import tomllib

        for item in finetuneTrainDefaults():
            key, value = item.split("=", 1)
            train[key.split(".", 1)[1]] = tomllib.loads(f"v = {value}")["v"]
    out = {field: train[key] for field, key in TRAIN_FIELDS.items()}
    methodDefaults = methodConfigDefaults(method)
    patch = methodDefaults.get("patch_size")
    out["patchSize"] = ",".join(str(int(v)) for v in patch) if patch is not None else ""
    return out


def overrides(p, method: str) -> list:
    """``--set`` items for the key hyperparameters of the GUI (advanced settings come after them)."""
    items = [f"train.{key}={getattr(p, field)!r}" for field, key in TRAIN_FIELDS.items()]
    items += [f'train.device="{p.device}"', "train.progress_bar=false"]  # the GUI shows progress itself
    patch = (p.patchSize or "").strip()
    if patch and method and "patch_size" in methodConfigDefaults(method):
        values = [v.strip() for v in patch.replace("x", ",").split(",") if v.strip()]
        if not all(v.isdigit() for v in values):
            raise ValueError(f"patch size {patch!r}: give whole voxel counts like 96,96,96")
        items.append(f"method.patch_size=[{','.join(values)}]")
    if method == "finetune":
        items.append(f'method.mode="{p.finetuneMode}"')
        initFrom = pathOrEmpty(p.initFromDirectory)
        if initFrom:
            items.append(f"method.init_from='{pathlib.Path(initFrom).resolve()}'")
    return items


def exportPath(runDir) -> pathlib.Path:
    runDir = pathlib.Path(runDir)
    return runDir / f"{runDir.name}.aemodel"


def hasCheckpoint(runDir) -> bool:
    """The run folder holds ``checkpoints/last.pt`` (what Resume continues and Export model exports)."""
    return (pathlib.Path(runDir) / "checkpoints" / "last.pt").is_file()


def runMethod(runDir) -> str:
    """The method of an existing run, from its ``RUN_DIR/config.toml`` ("" when there is none or it is unreadable)."""
    import tomllib

    try:
        data = tomllib.loads((pathlib.Path(runDir) / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    method = data.get("method")
    return method if isinstance(method, str) else ""


def resumeOverrides(p) -> list:
    """``--set`` items of a resume: the run keeps its saved settings, except where it runs and for how long (the
    time limit is per launch: "Resume continues the run with a new limit")."""
    return [f'train.device="{p.device}"', f"train.max_seconds={float(p.maxSeconds)!r}", "train.progress_bar=false"]


def pythonExecutable() -> str:
    # Inside Slicer the child must run Slicer's own Python (same packages); outside Slicer this interpreter.
    from anatomical_embedding.mrml import slicer_python

    return slicer_python(getattr(getattr(slicer, "app", None), "slicerHome", None))


def trainSettings(p, resume: bool = False):
    """The :class:`TrainSettings` for the parameter node's choices."""
    from anatomical_embedding.training.monitor import TrainSettings

    method = getMethod(p)
    runDir = pathOrEmpty(p.runDirectory)
    data = pathOrEmpty(p.dataDirectory)
    if not runDir:
        raise ValueError("Choose the run (output) folder.")
    if not data:
        raise ValueError("Choose the data folder (images, or the training folder exported from the scene).")
    if resume:
        # The run's own method, not the combo box's (after a restart it shows the first method): it decides
        # whether a package is exported (train.py refuses --export for a finetune run, exit 2).
        method = runMethod(runDir) or method
    elif not method:
        raise ValueError("Choose a method.")
    items = overrides(p, method) if not resume else resumeOverrides(p)
    return TrainSettings(
        out=runDir, data=data, labels=pathOrEmpty(p.labelsDirectory), method=method if not resume else "",
        overrides=items, advanced=p.advancedSettings if not resume else "", resume=resume,
        # A finetune run is a segmenter, not an embedding package: it is applied with `segment`.
        export=str(exportPath(runDir)) if p.exportModel and method != "finetune" else "",
        nproc=int(p.numProcesses),
        gpus=p.gpus.strip(), python=pythonExecutable(),
        script=str(TRAIN_SCRIPT))
