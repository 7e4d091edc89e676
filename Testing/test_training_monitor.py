"""The training monitor (the Trainer module's process control, Qt-free): command line, progress parsing,
stop (SIGTERM) and resume of a real ``train.py`` subprocess, and a crashed run leaving no package."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from anatomical_embedding.training.monitor import (
    EXIT_STOPPED,
    ProgressParser,
    TrainingMonitor,
    TrainingState,
    TrainSettings,
    build_command,
    default_train_script,
    toml_overrides,
)
from anatomical_embedding.training.runlock import RunFolderBusy, check_run_folder_free

#: A tiny AEFM (seconds per run on one CPU thread); log every 2 steps.
TINY = ["method.widths=[8,16,32,64]", "method.feature_dim=8", "method.spacing=[8.0,8.0,8.0]",
        "method.patch_size=[32,32,32]", "method.n_pos=50", "method.n_neg=512", "method.epochs_region=0",
        "train.batch_size=2", "train.log_every=2", "train.num_workers=0", "train.progress_bar=false",
        "train.tensorboard=false", "train.device=\"cpu\"", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from anatomical_embedding.phantoms import generate_cohort

    root = tmp_path_factory.mktemp("monitor_cohort")
    generate_cohort(root / "cohort", 3, seed=5, spacing=8.0, size=40, workers=1)
    return root / "cohort"


def settings(out: Path, data: Path, **kw) -> TrainSettings:
    kw.setdefault("overrides", TINY)
    return TrainSettings(out=str(out), data=str(data), method="aefm", threads=1, **kw)


# ---- command line --------------------------------------------------------------------------------
def test_toml_overrides_accept_tables_and_dotted_keys():
    text = '[train]\nlr = 3e-4\namp = "bf16"\n[method]\npatch_size = [64, 64, 32]\n[config]\nn_pos = 5\n'
    assert toml_overrides(text) == ["train.lr=0.0003", 'train.amp="bf16"', "method.patch_size=[64,64,32]",
                                    "method.n_pos=5"]
    assert toml_overrides("train.compile = true\n") == ["train.compile=true"]
    assert toml_overrides("  \n") == []
    with pytest.raises(ValueError, match="not valid TOML"):
        toml_overrides("[train\nlr = 1")
    with pytest.raises(ValueError, match="unknown entry 'optim'"):
        toml_overrides("[optim]\nlr = 1")
    with pytest.raises(ValueError, match="is a table"):
        toml_overrides("[train.sub]\nx = 1")


def test_overrides_round_trip_through_the_engine_config():
    """What toml_overrides writes is read back by the engine as the same values and types."""
    from anatomical_embedding.training.config import load_run_config

    items = toml_overrides('[train]\nlr = 3e-4\nwarmup_steps = 7\n[method]\npatch_size = [64, 48, 32]\npreset = "ct_aefm"\n')
    cfg = load_run_config("aefm", None, items)
    assert cfg.train.lr == 3e-4 and cfg.train.warmup_steps == 7
    assert cfg.method_config.patch_size == (64, 48, 32) and cfg.method_config.preset == "ct_aefm"


def test_build_command_single_process_and_torchrun(tmp_path):
    s = TrainSettings(out=str(tmp_path / "run"), data="/data", labels="/labels", method="aefm",
                      overrides=["train.lr=0.001"], advanced="[method]\nn_pos = 9\n", export=str(tmp_path / "m.aemodel"),
                      python="/opt/py", threads=1)
    argv, env = build_command(s)
    assert argv[:3] == ["/opt/py", "-u", str(default_train_script())]
    assert argv[argv.index("--data") + 1] == "/data" and argv[argv.index("--labels") + 1] == "/labels"
    assert argv[argv.index("--method") + 1] == "aefm"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["train.lr=0.001", "method.n_pos=9"]  # advanced settings come last, so they win
    assert argv[argv.index("--export") + 1] == str(tmp_path / "m.aemodel")
    assert env["PYTHONUNBUFFERED"] == "1" and env["OMP_NUM_THREADS"] == "1" and "CUDA_VISIBLE_DEVICES" not in env

    argv, env = build_command(TrainSettings(out="r", data="d", method="aefm", nproc=2, gpus="1, 3", python="py"))
    assert argv[:6] == ["py", "-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[6] == str(default_train_script()) and env["CUDA_VISIBLE_DEVICES"] == "1,3"

    argv, _ = build_command(TrainSettings(out="r", data="d", method="aefm", resume=True))
    assert "--resume" in argv and "--method" not in argv  # the run's config.toml names the method
    with pytest.raises(ValueError, match="one process per GPU"):
        build_command(TrainSettings(out="r", data="d", method="aefm", nproc=3, gpus="0,1"))
    with pytest.raises(ValueError, match="data folder"):
        build_command(TrainSettings(out="r", method="aefm"))
    with pytest.raises(ValueError, match="choose a method"):
        build_command(TrainSettings(out="r", data="d"))


def test_build_command_of_an_export_only_run(tmp_path):
    """TrainSettings(export_only=True): train.py exports the run folder without training (the Trainer's Export model):
    no data, method or torchrun (an export is one process); --overwrite only when replacing was allowed."""
    run, package = tmp_path / "run", tmp_path / "run" / "run.aemodel"
    argv, env = build_command(TrainSettings(out=str(run), export=str(package), export_only=True, nproc=2, python="py"))
    assert argv == ["py", "-u", str(default_train_script()), "--out", str(run), "--export-only", "--export", str(package)]
    assert env["PYTHONUNBUFFERED"] == "1"
    argv, _ = build_command(TrainSettings(out=str(run), export=str(package), export_only=True, overwrite=True))
    assert argv[-3:] == ["--export", str(package), "--overwrite"]
    with pytest.raises(ValueError, match="model package"):
        build_command(TrainSettings(out=str(run), export_only=True))


# ---- progress parsing ----------------------------------------------------------------------------
def test_parser_handles_split_lines_and_console_noise():
    p = ProgressParser()
    ev = {"event": "progress", "step": 4, "total_steps": 10, "epoch": 1, "loss": 2.5, "terms": {"a": 1.0}}
    line = json.dumps(ev)
    events, plain = p.feed("INFO starting\n" + line[:17])
    assert events == [] and plain == ["INFO starting"]
    events, plain = p.feed(line[17:] + "\nbar  10%\rbar  50%\r\n{not json\n")
    assert events == [ev] and plain == ["bar  50%", "{not json"]
    assert p.feed('{"event": "done", "step": 10}') == ([], [])  # unfinished line waits ...
    assert p.flush() == ([{"event": "done", "step": 10}], [])  # ... until the process has ended


def test_state_records_terms_and_resume_drops_later_records():
    st = TrainingState(status="running")
    st.apply({"event": "start", "method": "aefm", "total_steps": 8, "start_step": 0, "device": "cpu"})
    for step in (2, 4, 6):
        st.apply({"event": "progress", "step": step, "total_steps": 8, "epoch": step // 4, "loss": 1.0 / step,
                  "terms": {"ac_local": 0.5 / step}, "samples_per_s": 2.0, "eta_s": 65.0})
    assert [h["step"] for h in st.history] == [2, 4, 6] and st.history[1] == {"step": 4, "epoch": 1, "loss": 0.25,
                                                                            "ac_local": 0.125}
    assert st.summary() == "running: step 6/8, epoch 1, 2.00 samples/s, ETA 1m05s"
    st.apply({"event": "start", "total_steps": 8, "start_step": 4})  # resumed from the step-4 checkpoint
    assert [h["step"] for h in st.history] == [2, 4] and st.step == 4
    st.apply({"event": "error", "message": "boom"})
    assert st.error == "boom"


# ---- real subprocesses ---------------------------------------------------------------------------
def _wait_for_progress(mon: TrainingMonitor, timeout_s: float = 120.0) -> None:
    """Poll the monitor until the first progress line arrives (the child has imported and trained a step)."""
    import time

    deadline = time.monotonic() + timeout_s
    while mon.running and not mon.state.history and time.monotonic() < deadline:
        mon.poll()
        time.sleep(0.1)
    assert mon.state.history, f"no progress before the deadline; log: {list(mon.state.log_lines)[-5:]}"


@pytest.mark.slow  # two training processes (~10 s of imports each on a shared CPU)
def test_stop_then_resume(tiny_cohort, tmp_path):
    """The GUI's path: start, stop once progress arrives (checkpoint, exit 130), resume to the end."""
    run = tmp_path / "run"
    mon = TrainingMonitor(settings(run, tiny_cohort, overrides=TINY + ["train.max_steps=12", "train.ckpt_every=1000"]))
    mon.start()
    try:
        _wait_for_progress(mon)
        # The training process holds the run folder: a second start (a second Slicer, a shell) is refused.
        with pytest.raises(RunFolderBusy, match=rf"by process {mon.process.pid} \(started "):
            TrainingMonitor(settings(run, tiny_cohort)).start()
        mon.stop()
        st = mon.wait(timeout=120)
    finally:
        mon.close()
    assert st.status == "stopped" and st.returncode == EXIT_STOPPED
    check_run_folder_free(run)  # released when the process ended
    stopped_at = st.step
    assert 2 <= stopped_at < 12
    assert (run / "checkpoints" / "last.pt").is_file()

    mon.resume()
    try:
        st = mon.wait(timeout=300)
    finally:
        mon.close()
    assert st.status == "finished" and st.returncode == 0, st.error
    assert st.start_step == stopped_at and st.step == 12
    steps = [h["step"] for h in st.history]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # one curve across the stop, no repeated steps
    assert all(math.isfinite(h["loss"]) for h in st.history)
    # The console log of both parts is kept next to the run.
    text = (run / "console.log").read_text(encoding="utf-8")
    assert text.count('"event": "start"') == 2 and '"event": "stopped"' in text


def _stop_by_file(run, cohort, after_progress: bool):
    """Start a 40-step run, stop it (after its first progress line, or at once) and wait: the state, checked to be
    a stop with a checkpoint exit whose stop file was written and then consumed (a resume does not stop at once)."""
    from anatomical_embedding.training.progress import stop_file

    mon = TrainingMonitor(settings(run, cohort, overrides=TINY + ["train.max_steps=40", "train.ckpt_every=1000"]))
    mon.start()
    try:
        if after_progress:
            _wait_for_progress(mon)
        mon.stop()
        assert stop_file(run).is_file()
        st = mon.wait(timeout=120)
    finally:
        mon.close()
    assert st.status == "stopped" and st.returncode == EXIT_STOPPED, st.error
    assert not stop_file(run).exists()
    return st


def test_stop_file_checkpoints_without_any_signal(tiny_cohort, tmp_path, monkeypatch):
    """Windows has no SIGTERM for the child and CTRL_BREAK_EVENT needs a shared console: the stop is the run
    folder's stop file, on every platform once the loop runs (no signal is sent then: see the DataLoader test).
    The engine finishes the step, writes last.pt, reports the stop and exits 130, and the stop file is gone."""
    from anatomical_embedding.training import monitor as monitor_module

    run = tmp_path / "run"
    sent = []
    monkeypatch.setattr(monitor_module.os, "killpg", lambda pid, sig: sent.append(sig), raising=False)
    st = _stop_by_file(run, tiny_cohort, after_progress=True)
    assert (run / "checkpoints" / "last.pt").is_file() and 2 <= st.step < 40
    text = (run / "console.log").read_text(encoding="utf-8")
    assert '"signal": "STOP_FILE"' in text
    assert sent == []  # the loop had started: the stop file alone does it


@pytest.mark.slow  # one training process with a DataLoader worker (~15 s on a shared CPU)
def test_stop_leaves_the_data_loader_workers_alone(tiny_cohort, tmp_path):
    """With DataLoader worker processes (the engine's default num_workers is 2; the GUI keeps it), a stop once the
    loop runs ends in a checkpoint and exit 130. SIGTERM to the process group killed the workers too, and the run
    failed ("DataLoader worker ... is killed by signal: Terminated") without a checkpoint."""
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("train.num_workers")]
    mon = TrainingMonitor(settings(run, tiny_cohort, overrides=overrides + [
        "train.num_workers=1", "train.max_steps=400", "train.ckpt_every=1000"]))
    mon.start()
    try:
        _wait_for_progress(mon)
        mon.stop()
        st = mon.wait(timeout=120)
    finally:
        mon.close()
    assert st.status == "stopped" and st.returncode == EXIT_STOPPED, st.error
    assert (run / "checkpoints" / "last.pt").is_file() and 2 <= st.step < 400


def test_stop_during_the_set_up_is_a_stop_not_a_failure(tiny_cohort, tmp_path):
    """Stop pressed while the child still imports torch or prepares the data (minutes for a large cohort): the
    process ends at once, nothing was trained, and the run reads "stopped" - not "training failed (exit code -15:
    killed or crashed)" with an error dialog."""
    run = tmp_path / "run"
    mon = TrainingMonitor(settings(run, tiny_cohort, overrides=TINY + ["train.max_steps=400"]))
    mon.start()
    try:
        mon.stop()  # no "start" event yet
        st = mon.wait(timeout=60)
    finally:
        mon.close()
    assert st.status == "stopped" and st.error == "" and st.step == 0
    assert not (run / "checkpoints" / "last.pt").exists()


@pytest.mark.slow  # one training process (~10 s of imports on a shared CPU)
def test_stop_file_written_during_the_set_up_is_honoured(tiny_cohort, tmp_path, monkeypatch):
    """Without signals (Windows), a stop asked for before the loop starts is the stop file alone: the engine must
    honour it at the first step, not delete it as stale when the loop starts (the run went on to the end)."""
    from anatomical_embedding.training import monitor as monitor_module

    run = tmp_path / "run"
    monkeypatch.setattr(monitor_module.os, "killpg", lambda pid, sig: None, raising=False)
    st = _stop_by_file(run, tiny_cohort, after_progress=False)
    assert st.step == 1 and (run / "checkpoints" / "last.pt").is_file()


def test_a_stale_stop_file_does_not_stop_a_new_run(tmp_path):
    """A stop file left by a run killed before it saw it is removed by the next start (monitor) and by the engine
    when it predates the process; a newer one is kept."""
    import os
    import time

    from anatomical_embedding.training.engine import Trainer
    from anatomical_embedding.training.progress import stop_file

    run = tmp_path / "run"
    run.mkdir()
    stop_file(run).write_text("old\n", encoding="utf-8")
    old = time.time() - 60
    os.utime(stop_file(run), (old, old))
    Trainer(None, tmp_path, run, started_at=old + 1)._drop_stale_stop_request()
    assert not stop_file(run).exists()
    stop_file(run).write_text("new\n", encoding="utf-8")
    Trainer(None, tmp_path, run, started_at=time.time() - 5)._drop_stale_stop_request()
    assert stop_file(run).exists()

    script = tmp_path / "noop.py"
    script.write_text("", encoding="utf-8")
    mon = TrainingMonitor(TrainSettings(out=str(run), data=str(tmp_path), method="aefm", script=str(script),
                                        python=sys.executable))
    mon.start()
    assert not stop_file(run).exists()
    assert mon.wait(timeout=60).status == "finished"


def test_a_run_folder_trained_by_a_live_process_is_refused_and_the_lock_never_goes_stale(tmp_path):
    """A run folder that another live process trains (a shell's train.py, the child of a Slicer that crashed) is
    refused before anything starts or is written, with one line naming the process and the fix; once that process
    dies - even by SIGKILL, with no chance to clean up - the folder is free again."""
    import re
    import signal

    from lock_holder import hold_run_folder

    from anatomical_embedding.training.progress import stop_file
    from anatomical_embedding.training.runlock import RunFolderBusy, check_run_folder_free

    run = tmp_path / "run"
    script = tmp_path / "noop.py"
    script.write_text("", encoding="utf-8")
    mon = TrainingMonitor(TrainSettings(out=str(run), data=str(tmp_path), method="aefm", script=str(script),
                                        python=sys.executable))
    with hold_run_folder(run) as holder:
        stop_file(run).write_text("the live run's stop request\n", encoding="utf-8")
        with pytest.raises(RunFolderBusy) as err:
            mon.start()
        assert re.fullmatch(rf"{re.escape(str(run))} is being trained by process {holder.pid} \(started "
                            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); stop it or choose another run folder", str(err.value))
        assert mon.process is None and not mon.running
        assert stop_file(run).is_file()  # the live run's files are left alone
        assert not (run / "console.log").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_run_folder_free(run)  # the OS released the lock with the process: nothing stale
    mon.start()
    assert mon.wait(timeout=60).status == "finished"


FAKE_CRASH = """
import json, pathlib, sys
args = sys.argv[1:]
export = pathlib.Path(args[args.index("--export") + 1])
print(json.dumps({"event": "start", "total_steps": 10, "start_step": 0}), flush=True)
print(json.dumps({"event": "progress", "step": 2, "total_steps": 10, "epoch": 0, "loss": 1.5, "terms": {}}), flush=True)
# an export interrupted half way leaves atomic_write's temporary file behind, or an unverified package
(export.parent / ("." + export.stem + ".x1y2.aemodel")).write_bytes(b"partial")
export.write_bytes(b"written but not verified")
print("Traceback (most recent call last):\\nRuntimeError: worker died", file=sys.stderr, flush=True)
sys.exit(1)
"""


def test_crashed_process_gives_a_clear_error_and_no_package(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(FAKE_CRASH), encoding="utf-8")
    package = tmp_path / "out" / "m.aemodel"
    package.parent.mkdir()
    (package.parent / "other.aemodel").write_bytes(b"a user's file")  # left alone
    mon = TrainingMonitor(TrainSettings(out=str(tmp_path / "run"), data=str(tmp_path), method="aefm",
                                        script=str(script), export=str(package), python=sys.executable))
    mon.start()
    st = mon.wait(timeout=60)
    assert st.status == "failed" and st.returncode == 1
    assert st.error.startswith("training failed (exit code 1: unexpected error")
    assert "RuntimeError: worker died" in st.error
    assert [h["step"] for h in st.history] == [2]  # progress up to the crash is kept
    assert [f.name for f in package.parent.iterdir()] == ["other.aemodel"]  # no package, no partial file
    assert not st.exported


def test_monitor_refuses_an_existing_package_and_double_start(tmp_path):
    package = tmp_path / "m.aemodel"
    package.write_bytes(b"x")
    mon = TrainingMonitor(TrainSettings(out=str(tmp_path / "run"), data=str(tmp_path), method="aefm",
                                        export=str(package)))
    with pytest.raises(FileExistsError, match="exists"):
        mon.start()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        mon.resume()


FAKE_TORCHRUN = """
import json, sys
mode = sys.argv[sys.argv.index("--set") + 1]
print(json.dumps({"event": "start", "total_steps": 10, "start_step": 0}), flush=True)
if mode == "stop":  # workers saved a checkpoint, but the torchrun agent exits 1 on SIGTERM
    print(json.dumps({"event": "stopped", "step": 3, "signal": "SIGTERM", "checkpoint": "c/last.pt"}), flush=True)
else:  # a rank refused its input (train.py exit 2); torchrun reports 1
    print(json.dumps({"event": "error", "message": "no images found in /x", "exit_code": 2}), flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("mode", ["stop", "error"])
def test_outcome_follows_the_events_when_torchrun_hides_the_exit_code(tmp_path, mode):
    script = tmp_path / "fake.py"
    script.write_text(textwrap.dedent(FAKE_TORCHRUN), encoding="utf-8")
    mon = TrainingMonitor(TrainSettings(out=str(tmp_path / "run"), data=str(tmp_path), method="aefm",
                                        script=str(script), overrides=[mode]))
    mon.start()
    st = mon.wait(timeout=60)
    assert st.returncode == 1
    if mode == "stop":
        assert st.status == "stopped" and st.step == 3 and st.checkpoint == "c/last.pt"
    else:
        assert st.status == "failed"
        assert st.error == "training failed (exit code 2: bad input (data, settings or output folder)): " \
                           "no images found in /x"


def test_read_history_rebuilds_the_curve_of_an_earlier_run(tmp_path):
    from anatomical_embedding.training.monitor import read_history

    lines = [{"event": "start", "total_steps": 6, "start_step": 0},
             {"event": "progress", "step": 2, "total_steps": 6, "epoch": 0, "loss": 3.0, "terms": {"a": 1.0}},
             {"event": "progress", "step": 4, "total_steps": 6, "epoch": 1, "loss": 2.0, "terms": {"a": 0.5}},
             {"event": "stopped", "step": 5, "signal": "SIGTERM", "checkpoint": "last.pt"}]
    (tmp_path / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    st = read_history(tmp_path)
    assert st.status == "stopped" and st.step == 5 and [h["loss"] for h in st.history] == [3.0, 2.0]
    assert read_history(tmp_path / "none").status == "idle"
