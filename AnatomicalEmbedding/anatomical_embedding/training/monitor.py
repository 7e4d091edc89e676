"""Launch, watch, stop and resume a training subprocess (``AnatomicalEmbeddingTrainerLib/train.py``); Qt-free.

The Trainer module drives training through this class so that the same code is tested without Slicer:

* :class:`TrainSettings` + :func:`build_command`: the command line (``python train.py ...``, or
  ``python -m torch.distributed.run --nproc_per_node N train.py ...`` for several processes) and the
  child environment (``CUDA_VISIBLE_DEVICES`` for the chosen GPUs, unbuffered output).
* :class:`TrainingMonitor`: ``start()`` runs it with stdout+stderr appended to ``RUN_DIR/console.log``;
  ``poll()`` (call it from a timer; it never blocks) reads what was appended since the last call, parses
  the engine's JSON progress lines (:mod:`.training.progress`) into :class:`TrainingState`, and notices
  when the process ended; ``stop()`` writes the run's stop file (the engine finishes the step, saves
  ``checkpoints/last.pt`` and exits with 130) or, while the process is still setting up, ends it with SIGTERM;
  ``kill()`` ends it at once; ``resume()`` starts it again with ``--resume``. ``start()`` refuses a run folder
  that a live process trains (``runlock.RunFolderBusy``; the engine holds ``RUN_DIR/train.lock`` while it trains).
  ``TrainSettings(export_only=True)`` runs ``train.py --export-only`` the same way: the run folder's checkpoint is
  exported (and checked against PyTorch) without training.

Reading a log file by offset (rather than a pipe) keeps polling non-blocking on every platform and keeps
the whole console output next to the run for later inspection.
"""
from __future__ import annotations

import codecs
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

#: Exit codes of ``train.py`` (also documented in its ``--help``).
EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_NO_CUDA, EXIT_GPU_OOM, EXIT_STOPPED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_UNEXPECTED: "unexpected error (see the log)",
    EXIT_BAD_INPUT: "bad input (data, settings or output folder)",
    EXIT_NO_CUDA: "CUDA requested but no CUDA GPU is available",
    EXIT_GPU_OOM: "GPU out of memory (reduce the patch size or the batch size)",
    EXIT_STOPPED: "stopped; a checkpoint was saved (resume to continue)",
}
CONSOLE_LOG = "console.log"
#: The child's environment variable with the launch time: train.py keeps a stop file newer than it (a Stop pressed
#: while the child still imports torch) and drops an older one as stale.
LAUNCHED_AT_ENV = "ANATOMICAL_EMBEDDING_LAUNCHED_AT"


def default_train_script() -> Path:
    """``AnatomicalEmbeddingTrainerLib/train.py`` of a source checkout (the Slicer module passes its own)."""
    return Path(__file__).resolve().parents[3] / "AnatomicalEmbeddingTrainer" / "AnatomicalEmbeddingTrainerLib" / "train.py"


def toml_overrides(text: str) -> list[str]:
    """Advanced settings as TOML (``[train]`` and ``[method]``/``[config]`` tables, or dotted keys) -> ``--set`` items.

    ``[train] lr = 3e-4`` and ``train.lr = 3e-4`` both give ``train.lr=0.0003``. Raises ValueError naming the
    problem, so the GUI can refuse to start with a clear message.
    """
    if not text or not text.strip():
        return []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"advanced settings are not valid TOML: {exc}") from None
    out = []
    for section, values in data.items():
        if section == "config":
            section = "method"
        if section not in ("train", "method") or not isinstance(values, dict):
            raise ValueError(f"advanced settings: unknown entry {section!r}; use [train] and [method] tables "
                             "(e.g. [train] lr = 3e-4)")
        for key, value in values.items():
            if isinstance(value, dict):
                raise ValueError(f"advanced settings: {section}.{key} is a table; settings are plain values")
            out.append(f"{section}.{key}={toml_value(value)}")
    return out


def toml_value(value) -> str:
    """A value as a TOML literal (``--set KEY=VALUE`` and help texts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


@dataclass
class TrainSettings:
    """Everything the Trainer module (or a script) chooses for one run."""

    out: str  # RUN_DIR
    data: str = ""
    labels: str = ""
    method: str = ""
    config_file: str = ""
    overrides: list[str] = field(default_factory=list)  # "train.lr=1e-4", "method.patch_size=[64,64,64]"
    advanced: str = ""  # TOML text, applied after ``overrides`` (see toml_overrides)
    resume: bool = False
    export: str = ""  # .aemodel written when training finishes ("" = no export)
    export_only: bool = False  # no training: export the run folder's checkpoint to ``export`` (train.py --export-only)
    overwrite: bool = False  # ``export`` may replace an existing file (once the new package is written)
    nproc: int = 1  # processes on this node (> 1: torchrun / DDP)
    gpus: str = ""  # CUDA_VISIBLE_DEVICES, e.g. "0,1" ("" = all visible)
    python: str = ""  # interpreter ("" = this one); Slicer passes PythonSlicer
    script: str = ""  # train.py ("" = default_train_script())
    threads: int = 0  # OMP_NUM_THREADS of the child (0 = inherit)
    extra_env: dict = field(default_factory=dict)


def build_command(s: TrainSettings) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for the training process; ValueError for settings that cannot work."""
    if not s.out:
        raise ValueError("choose an output (run) folder")
    if s.export_only and not s.export:
        raise ValueError("choose the model package (.aemodel) to export to")
    if not s.data and not s.export_only:
        raise ValueError("choose a data folder (images, a cohort folder or a manifest .json)")
    if not s.resume and not s.method and not s.config_file and not s.export_only:
        raise ValueError("choose a method")
    if s.nproc < 1:
        raise ValueError(f"number of processes must be at least 1, got {s.nproc}")
    gpus = [g.strip() for g in s.gpus.split(",") if g.strip()]
    if gpus and s.nproc > len(gpus):
        raise ValueError(f"{s.nproc} processes but only {len(gpus)} GPU(s) selected ({s.gpus}); "
                         "use one process per GPU")
    script = Path(_abs(s.script)) if s.script else default_train_script()
    if not script.is_file():
        raise FileNotFoundError(f"training script {script} not found")
    python = s.python or sys.executable
    argv = [python, "-u"]
    if s.nproc > 1 and not s.export_only:  # an export is one process
        argv += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.nproc}"]
    # Absolute paths: the child runs in RUN_DIR.
    argv += [str(script)] + (["--data", _abs(s.data)] if s.data else []) + ["--out", _abs(s.out)]
    if s.export_only:
        argv.append("--export-only")
    if s.labels:
        argv += ["--labels", _abs(s.labels)]
    if s.resume:
        argv.append("--resume")
    else:
        if s.method:
            argv += ["--method", s.method]
        if s.config_file:
            argv += ["--config", _abs(s.config_file)]
    for item in [*s.overrides, *toml_overrides(s.advanced)]:
        argv += ["--set", item]
    if s.export:
        argv += ["--export", _abs(s.export)] + (["--overwrite"] if s.overwrite else [])
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if s.threads > 0:
        env["OMP_NUM_THREADS"] = str(s.threads)
    env.update({str(k): str(v) for k, v in s.extra_env.items()})
    return argv, env


def _abs(path) -> str:
    return os.path.abspath(os.fspath(path))


class ProgressParser:
    """Splits appended console text into lines; JSON protocol lines become event dicts."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> tuple[list[dict], list[str]]:
        text = self._partial + text
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished line waits for the next feed
        events, plain = [], []
        for line in lines:
            line = line.rstrip("\r")
            # tqdm redraws with carriage returns: keep the last state of such a line.
            line = line.rsplit("\r", 1)[-1]
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    plain.append(line)
                    continue
                if isinstance(rec, dict) and "event" in rec:
                    events.append(rec)
                    continue
            if line.strip():
                plain.append(line)
        return events, plain

    def flush(self) -> tuple[list[dict], list[str]]:
        rest, self._partial = self._partial, ""
        return self.feed(rest + "\n") if rest else ([], [])


@dataclass
class TrainingState:
    status: str = "idle"  # idle | running | finished | stopped | failed
    method: str = ""
    step: int = 0
    total_steps: int = 0
    start_step: int = 0
    epoch: int = 0
    eta_s: float | None = None
    samples_per_s: float | None = None
    gpu_mem_mb: float | None = None
    device: str = ""
    world_size: int = 1
    returncode: int | None = None
    error: str = ""
    error_code: int | None = None  # exit code named by train.py's error event (torchrun reports its own code)
    checkpoint: str = ""
    exported: str = ""
    stopped: bool = False  # a "stopped" event arrived (torchrun may not pass exit code 130 through)
    history: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss", <term>: value}
    log_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

    def apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            self.method = ev.get("method", self.method)
            self.total_steps = int(ev.get("total_steps", 0))
            self.start_step = self.step = int(ev.get("start_step", 0))
            self.device, self.world_size = ev.get("device", ""), int(ev.get("world_size", 1))
            # A resumed run repeats nothing before start_step: drop records the stopped run logged after it.
            self.history = [h for h in self.history if h["step"] <= self.start_step]
        elif kind == "progress":
            self.step, self.epoch = int(ev["step"]), int(ev.get("epoch", 0))
            self.total_steps = int(ev.get("total_steps", self.total_steps))
            self.eta_s, self.samples_per_s = ev.get("eta_s"), ev.get("samples_per_s")
            self.gpu_mem_mb = ev.get("gpu_mem_mb")
            self.history.append({"step": self.step, "epoch": self.epoch, "loss": float(ev["loss"]),
                                 **{k: float(v) for k, v in (ev.get("terms") or {}).items()}})
        elif kind == "checkpoint":
            self.checkpoint = ev.get("path", "")
        elif kind == "stopped":
            self.step = int(ev.get("step", self.step))
            self.checkpoint = ev.get("checkpoint", self.checkpoint)
            self.stopped = True
        elif kind == "done":
            self.step = int(ev.get("step", self.step))
        elif kind == "error":
            self.error = str(ev.get("message", ""))  # the last one is the clearest (train.py explains)
            if ev.get("exit_code") is not None:
                self.error_code = int(ev["exit_code"])
        elif kind == "exported":
            self.exported = str(ev.get("path", ""))

    def summary(self) -> str:
        """One line for the GUI: step/epoch, throughput and ETA."""
        if self.status == "idle":
            return "Not started."
        parts = [f"step {self.step}/{self.total_steps or '?'}", f"epoch {self.epoch}"]
        if self.samples_per_s:
            parts.append(f"{self.samples_per_s:.2f} samples/s")
        if self.status == "running" and self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if self.gpu_mem_mb:
            parts.append(f"GPU {self.gpu_mem_mb:.0f} MB")
        return f"{self.status}: " + ", ".join(parts)


def format_duration(seconds: float) -> str:
    s = int(max(0, round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class TrainingMonitor:
    """One training run as a child process; the caller polls (see module doc)."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings
        self.state = TrainingState()
        self.process: subprocess.Popen | None = None
        self._parser = ProgressParser()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._log_fh = None
        self._offset = 0
        self._started_at = 0.0
        self._loop_started = False  # this launch's "start" event arrived (signal handlers and data workers exist)
        self.stop_requested = False
        self.argv: list[str] = []

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.out)

    @property
    def log_path(self) -> Path:
        return self.run_dir / CONSOLE_LOG

    @property
    def running(self) -> bool:
        return self.process is not None and self.state.status == "running"

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self.running:
            raise RuntimeError("training is already running; stop it first")
        argv, env = build_command(self.settings)
        from anatomical_embedding.training.runlock import check_run_folder_free

        # Refused before anything is written (the stop file and console.log below belong to the live run then).
        # The child takes the lock itself (engine.Trainer), so a crash of this process does not unprotect it.
        check_run_folder_free(self.run_dir)
        if self.settings.export and Path(self.settings.export).exists() and not self.settings.overwrite:
            raise FileExistsError(f"model package {self.settings.export} exists; choose another name")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from anatomical_embedding.training.progress import stop_file

        stop_file(self.run_dir).unlink(missing_ok=True)  # a request left by a killed run must not end this one
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._parser = ProgressParser()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._log_fh = open(self.log_path, "ab")
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # stop() signals the whole group (torchrun and its workers)
        else:  # pragma: no cover - Windows: no console window; stop() uses the stop file, not CTRL_BREAK
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        log.info("Starting training: %s", " ".join(argv))
        self.argv = argv
        self._started_at = time.time()
        env[LAUNCHED_AT_ENV] = repr(self._started_at)
        self._loop_started = self.stop_requested = False
        self.process = subprocess.Popen(argv, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=str(self.run_dir), **kwargs)
        st = self.state
        st.status, st.returncode, st.error, st.exported, st.stopped = "running", None, "", "", False
        st.error_code = None

    def resume(self) -> None:
        """Continue a stopped (or crashed, if a checkpoint exists) run with ``--resume``."""
        if not (self.run_dir / "checkpoints" / "last.pt").is_file():
            raise FileNotFoundError(f"no checkpoint in {self.run_dir / 'checkpoints'} to resume from")
        self.settings = replace(self.settings, resume=True)
        self.start()

    def stop(self) -> None:
        """Ask for a graceful stop: the engine finishes the step, saves last.pt and exits 130.

        The request is the run folder's stop file (``progress.STOP_FILE_NAME``), which every rank checks after each
        step, on every platform. No signal is sent once the training loop runs: SIGTERM to the process group would
        also reach the DataLoader worker processes (and torchrun forwards it to each rank's group), which die of it,
        so the run would fail without a checkpoint. While the process is still setting up (no "start" event yet:
        no workers, nothing to save) the POSIX process group gets SIGTERM, so a long preprocessing ends at once.
        """
        if not self.running:
            return
        from anatomical_embedding.training.progress import stop_file

        self.poll()  # has the loop started? (its "start" event precedes the signal handlers and the workers)
        if not self.running:
            return
        self.stop_requested = True
        try:
            stop_file(self.run_dir).write_text("stop requested\n", encoding="utf-8")
        except OSError as exc:
            log.warning("could not write the stop file: %s", exc)
        if os.name == "posix" and not self._loop_started:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Hard stop (no checkpoint); used when a graceful stop does not end the process."""
        if self.process is not None and self.process.poll() is None:
            self.stop_requested = True  # the user's choice: the run reads "stopped", not "failed"
            try:
                if os.name == "posix":
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:  # pragma: no cover - Windows
                    # The whole tree: Slicer's PythonSlicer.exe is a launcher whose python-real.exe child trains (and
                    # torchrun has ranks); TerminateProcess on the launcher alone would leave them running.
                    try:
                        subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                                       capture_output=True, timeout=30, check=True)
                    except (OSError, subprocess.SubprocessError):
                        self.process.kill()
            except ProcessLookupError:
                pass
            self.process.wait()

    # ------------------------------------------------------------------ polling
    def _read_new(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        # Incremental decoding: a multi-byte character cut in half by a poll is completed by the next one.
        return self._decoder.decode(data) if data else ""

    def poll(self) -> list[dict]:
        """New progress events since the last call (the state is updated); never blocks."""
        if self.process is None:
            return []
        rc = self.process.poll()  # read the return code first so the log read below holds all its output
        events, lines = self._parser.feed(self._read_new())
        if rc is not None and self.state.status == "running":
            more_ev, more_lines = self._parser.flush()
            events, lines = events + more_ev, lines + more_lines
        for ev in events:
            self.state.apply(ev)
            if ev.get("event") == "start":
                self._loop_started = True
        self.state.log_lines.extend(lines)
        if rc is not None and self.state.status == "running":
            self._finish(rc)
        return events

    def _finish(self, rc: int) -> None:
        st = self.state
        st.returncode = rc
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None
        what = "export" if self.settings.export_only else "training"
        if rc == EXIT_OK:
            st.status = "finished"
            if self.settings.export and not st.exported:
                st.status, st.error = "failed", f"{what} finished but no model package was exported"
        elif rc == EXIT_STOPPED or st.stopped or (self.stop_requested and not st.error):
            # A stop during set-up ends the process by SIGTERM (no checkpoint, nothing lost): not a failure.
            st.status = "stopped"
        else:
            st.status = "failed"
            detail = st.error or next((ln for ln in reversed(st.log_lines) if ln.strip()), "")
            code = st.error_code if st.error_code is not None else rc
            st.error = f"{what} failed (exit code {code}: {EXIT_CODES.get(code, 'killed or crashed')})" + \
                (f": {detail}" if detail else "")
        if st.status != "finished":
            self._remove_partial_export()

    def _remove_partial_export(self) -> None:
        """A run that did not finish leaves no package: drop what an interrupted export wrote.

        start() refused an existing package, so files at the package path (and its sidecar) or export temp
        files newer than the start are this run's: a package written but never verified is removed too.
        """
        if not self.settings.export:
            return
        target = Path(self.settings.export)
        candidates = [target, target.with_name(target.name + ".sha256"), *target.parent.glob(f".{target.stem}.*")]
        for path in candidates:
            if path.is_file() and path.stat().st_mtime >= self._started_at - 1:
                path.unlink(missing_ok=True)
        self.state.exported = ""

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> TrainingState:
        """Poll until the process ends (scripts and tests; the GUI polls from a timer instead)."""
        t_end = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if not self.running:
                break
            if t_end is not None and time.monotonic() > t_end:
                raise TimeoutError(f"training did not end within {timeout} s")
            time.sleep(interval)
        return self.state

    def close(self) -> None:
        """Stop (gracefully, then hard after 30 s) and release the log file; safe to call twice."""
        if self.running:
            self.stop()
            try:
                self.wait(timeout=30)
            except TimeoutError:
                self.kill()
                self.poll()
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None


def read_history(run_dir: str | os.PathLike) -> TrainingState:
    """State rebuilt from ``RUN_DIR/progress.jsonl`` (e.g. to show an earlier run before resuming it)."""
    from anatomical_embedding.training.progress import read_progress

    st = TrainingState()
    path = Path(run_dir) / "progress.jsonl"
    if path.is_file():
        for ev in read_progress(path):
            st.apply(ev)
        st.status = "stopped" if st.history else "idle"
    return st
