# ruff: noqa: N999  (Slicer convention: CamelCase helper modules in <Module>Lib)
"""The "Import published model..." action of the AnatomicalEmbedding module.

* :class:`ImportPretrainedLogic`: engine call + registration, no GUI (runs on slicer-core, tested in
  ``Testing/test_import_pretrained.py``);
* :class:`ImportPretrainedDialog`: a thin Qt dialog on top (format, file, name, progress, help). Qt is imported
  only when the dialog is built, so importing this file never needs a GUI.

Hook into the module's Model panel with one button::

    from AnatomicalEmbeddingLib.ImportPretrained import ImportPretrainedDialog
    ImportPretrainedDialog(parent=slicer.util.mainWindow(), on_imported=lambda entry: refresh_and_select(entry),
                           ensure_dependencies=lambda: logic.ensureImportDependencies(askUser=True)).exec_()

Nothing is downloaded: the user picks a file they downloaded from the project's page (see :func:`help_text`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_LABELS = {
    "aefm": "AEFM: abdomen_foundation.pth (abdominal CT)",
    "vox2vec": "vox2vec: vox2vec_contrastive.pt (chest/abdominal CT)",
    "hdssl": "HDSSL: CT or MRI .ckpt (backbone levels only)",
}
FILE_FILTER = "Checkpoints (*.pth *.pt *.ckpt *.tar);;All files (*)"


def help_text() -> str:
    """Where each project publishes its checkpoint, and what importing does (HTML for a QLabel)."""
    from anatomical_embedding.inference.published import HDSSL_CAVEAT, PUBLISHED_SOURCES

    items = "".join(f"<li>{text}</li>" for text in PUBLISHED_SOURCES.values())
    return (
        "<p>Turns a checkpoint you downloaded from one of these projects into a model package "
        "(ONNX + model card with the published spacing, intensity window and orientation). "
        "Nothing is downloaded by Slicer: get the file from the project's page first.</p>"
        f"<ul>{items}</ul><p><b>HDSSL:</b> {HDSSL_CAVEAT}</p>"
    )


def guess_format(path: str | os.PathLike) -> str | None:
    """The format a published file name suggests (the dialog preselects it; the import still checks the keys)."""
    name = Path(path).name.lower()
    if "foundation" in name or "aefm" in name:
        return "aefm"
    if "vox2vec" in name:
        return "vox2vec"
    if "hdssl" in name or name.endswith(".ckpt"):
        return "hdssl"
    return None


class ImportPretrainedLogic:
    """Import a published checkpoint into ``models_dir`` and register it so the model list shows it."""

    def __init__(self, models_dir: str | os.PathLike | None = None,
                 registry: str | os.PathLike | None = None) -> None:
        from anatomical_embedding.inference.registry import registry_path

        self.registry = Path(registry) if registry else None
        # Packages live next to the registry file by default (a per-user folder, not the Slicer install).
        self.models_dir = Path(models_dir) if models_dir else registry_path(self.registry).parent / "models"

    def default_output_path(self, fmt: str, checkpoint: str | os.PathLike) -> Path:
        """``<models_dir>/<format>-<checkpoint stem>.aemodel``, numbered so no existing package is replaced."""
        stem = f"{fmt}-{Path(checkpoint).stem}"
        out = self.models_dir / f"{stem}.aemodel"
        n = 2
        while out.exists():
            out = self.models_dir / f"{stem}-{n}.aemodel"
            n += 1
        return out

    def import_model(self, fmt: str, checkpoint: str | os.PathLike, name: str | None = None,
                     out: str | os.PathLike | None = None, modality: str = "ct",
                     network_config: Mapping[str, Any] | None = None,
                     progress: Callable[[float, str], None] | None = None) -> dict:
        """Import and register; returns the registry entry (``name``, ``path``, ``method``, ``sha256``)."""
        from anatomical_embedding.inference.import_pretrained import import_published

        out = Path(out) if out else self.default_output_path(fmt, checkpoint)
        name = name or f"{fmt} ({Path(checkpoint).name})"
        result = import_published(fmt, checkpoint, out, name=name, modality=modality, network_config=network_config,
                                  register=True, registry=self.registry, progress=progress)
        return result.registry_entry or {}


class ImportPretrainedDialog:
    """Modal dialog: format, file, name, progress bar, help text. ``on_imported(entry)`` after success."""

    def __init__(self, parent=None, on_imported: Callable[[dict], None] | None = None,
                 logic: ImportPretrainedLogic | None = None,
                 ensure_dependencies: Callable[[], bool] | None = None) -> None:
        import ctk
        import qt

        self.logic = logic or ImportPretrainedLogic()
        self.on_imported = on_imported
        # Importing needs PyTorch (+ MONAI for AEFM) and onnx: the module's installer, asked before the work starts.
        self.ensure_dependencies = ensure_dependencies
        self.entry: dict | None = None
        d = self.dialog = qt.QDialog(parent)
        d.setWindowTitle("Import published model")
        layout = qt.QFormLayout(d)
        self.formatCombo = qt.QComboBox()
        for fmt, label in FORMAT_LABELS.items():
            self.formatCombo.addItem(label, fmt)
        self.modalityCombo = qt.QComboBox()
        self.modalityCombo.addItems(["CT", "MRI"])
        self.pathEdit = ctk.ctkPathLineEdit()
        self.pathEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.pathEdit.nameFilters = [FILE_FILTER]
        self.nameEdit = qt.QLineEdit()
        self.nameEdit.placeholderText = "shown in the model list (default: format and file name)"
        self.helpLabel = qt.QLabel(help_text())
        self.helpLabel.wordWrap = True
        self.helpLabel.openExternalLinks = True
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        buttons = qt.QDialogButtonBox()
        self.importButton = buttons.addButton("Import", qt.QDialogButtonBox.AcceptRole)
        buttons.addButton(qt.QDialogButtonBox.Close)
        layout.addRow(self.helpLabel)
        layout.addRow("Format:", self.formatCombo)
        layout.addRow("Modality:", self.modalityCombo)
        layout.addRow("Checkpoint file:", self.pathEdit)
        layout.addRow("Name:", self.nameEdit)
        layout.addRow(self.progressBar)
        layout.addRow(self.statusLabel)
        layout.addRow(buttons)
        self.formatCombo.connect("currentIndexChanged(int)", self._update_modality)
        self.pathEdit.connect("currentPathChanged(QString)", self._guess_format)
        self.importButton.connect("clicked()", self.run_import)
        buttons.connect("rejected()", d.reject)
        self._update_modality()

    def _update_modality(self, *_: Any) -> None:
        hdssl = self.formatCombo.currentData == "hdssl"
        self.modalityCombo.enabled = hdssl  # only HDSSL publishes an MRI model
        if not hdssl:
            self.modalityCombo.currentIndex = 0

    def _guess_format(self, path: str) -> None:
        fmt = guess_format(path) if path else None
        if fmt is not None:
            self.formatCombo.currentIndex = self.formatCombo.findData(fmt)
        if "mri" in str(path).lower():
            self.modalityCombo.currentIndex = 1

    def _progress(self, fraction: float, message: str) -> None:
        import slicer

        self.progressBar.value = round(100 * fraction)
        self.statusLabel.text = message
        slicer.app.processEvents()  # keep the dialog painting during the export

    def run_import(self) -> dict | None:
        import qt
        import slicer

        checkpoint = self.pathEdit.currentPath
        if not checkpoint:
            self.statusLabel.text = "Choose the downloaded checkpoint file first."
            return None
        if self.ensure_dependencies is not None and not self.ensure_dependencies():
            self.statusLabel.text = "Importing needs PyTorch and onnx; install them first."
            return None
        self.importButton.enabled = False
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.entry = self.logic.import_model(
                self.formatCombo.currentData, checkpoint, name=self.nameEdit.text.strip() or None,
                modality=self.modalityCombo.currentText.lower(), progress=self._progress)
        except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
            self.statusLabel.text = f"Import failed: {exc}"
            slicer.util.errorDisplay(f"Import failed:\n{exc}", parent=self.dialog)
            return None
        finally:
            qt.QApplication.restoreOverrideCursor()
            self.importButton.enabled = True
        if self.on_imported is not None:
            self.on_imported(self.entry)
        self.dialog.accept()
        return self.entry

    def exec_(self) -> int:
        return self.dialog.exec_()
