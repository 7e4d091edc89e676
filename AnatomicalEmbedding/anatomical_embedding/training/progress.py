"""Training progress as JSON lines (stdout and ``RUN_DIR/progress.jsonl``), CSV metrics and TensorBoard.

One JSON object per line; every line has ``"event"`` and ``"time"`` (Unix seconds). Events:

* ``{"event": "start", "run_dir": str, "method": str, "total_steps": int, "start_step": int,
  "world_size": int, "device": str, "n_cases": int}``
* ``{"event": "progress", "step": int, "total_steps": int, "epoch": int, "loss": float,
  "terms": {name: float}, "lr": float, "samples_per_s": float, "eta_s": float,
  "gpu_mem_mb": float | null}`` — one per logging interval; ``step`` counts finished optimiser steps,
  ``loss``/``terms`` are means over the interval and over DDP ranks.
* ``{"event": "checkpoint", "step": int, "path": str, "best": bool}``
* ``{"event": "eval", "step": int, "metrics": {name: float}, "seconds": float}`` — methods with a validation
  hook (``Method.evaluate``, e.g. finetuning's ``val_dice``), every ``eval_every`` steps and at the end.
* ``{"event": "done", "step": int, "run_dir": str}``
* ``{"event": "stopped", "step": int, "signal": str, "checkpoint": str}`` — SIGINT/SIGTERM, the stop file
  (``STOP_FILE``) or ``train.max_seconds`` (``TIME_LIMIT``): a checkpoint was saved, the process exits with code
  130; resume with ``--resume``.
* ``{"event": "error", "message": str}``

Lines that do not start with ``{`` (e.g. logging on stderr) are not part of the protocol.
``RUN_DIR/metrics.csv`` has one row per progress event: step, epoch, loss, lr, samples_per_s,
gpu_mem_mb and one column per loss term.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path

#: A graceful stop that works on every platform: the run folder gets this file, the engine sees it at the end of
#: the step, saves ``checkpoints/last.pt`` and exits 130 (as for SIGINT/SIGTERM). Windows has no SIGTERM for a
#: windowless child, and CTRL_BREAK_EVENT needs a shared console.
STOP_FILE_NAME = "STOP"


def stop_file(run_dir) -> Path:
    return Path(run_dir) / STOP_FILE_NAME

log = logging.getLogger(__name__)


class ProgressWriter:
    """Rank-0 sink for events, metrics and TensorBoard scalars (every method uses the same one)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, stdout=None, echo: bool = True) -> None:
        self.run_dir = Path(run_dir)
        # echo=False keeps the protocol in progress.jsonl only (the demo shows its own progress bar).
        self.stdout = (stdout if stdout is not None else sys.stdout) if echo else None
        self._jsonl = open(self.run_dir / "progress.jsonl", "a", encoding="utf-8")
        self._csv_path = self.run_dir / "metrics.csv"
        self._csv_fields: list[str] | None = None
        if self._csv_path.exists():
            with open(self._csv_path, newline="", encoding="utf-8") as fh:
                self._csv_fields = next(csv.reader(fh), None)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as exc:  # optional dependency
                log.info("TensorBoard logging off (%s)", exc)

    def event(self, event: str, **fields) -> dict:
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(rec)
        if self.stdout is not None:
            print(line, file=self.stdout, flush=True)
        self._jsonl.write(line + "\n")
        self._jsonl.flush()
        return rec

    def metrics(self, step: int, epoch: int, loss: float, terms: dict, lr: float, samples_per_s: float,
                gpu_mem_mb: float | None) -> None:
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": samples_per_s,
               "gpu_mem_mb": "" if gpu_mem_mb is None else gpu_mem_mb, **terms}
        if self._csv_fields is None or set(row) - set(self._csv_fields):
            # New loss terms (e.g. AEFM's region stage) widen the table: rewrite it with the new header.
            old_rows = []
            if self._csv_fields is not None and self._csv_path.exists():
                with open(self._csv_path, newline="", encoding="utf-8") as fh:
                    old_rows = list(csv.DictReader(fh))
            self._csv_fields = (self._csv_fields or []) + [k for k in row if k not in (self._csv_fields or [])]
            tmp = self._csv_path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, self._csv_fields)
                w.writeheader()
                w.writerows(old_rows)
            tmp.replace(self._csv_path)
        with open(self._csv_path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, self._csv_fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            self._tb.add_scalar("loss/total", loss, step)
            for k, v in terms.items():
                self._tb.add_scalar(f"loss/{k}", v, step)
            self._tb.add_scalar("lr", lr, step)
            self._tb.add_scalar("samples_per_s", samples_per_s, step)
            if gpu_mem_mb is not None:
                self._tb.add_scalar("gpu_mem_mb", gpu_mem_mb, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_progress(path: Path) -> list[dict]:
    """Parse a progress stream (file or captured stdout), skipping non-protocol lines."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
