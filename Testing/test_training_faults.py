"""Training faults (issue 21): damaged checkpoints, exact global RNG states after a resume, and SIGKILL
at random points (during checkpoint writes included) followed by --resume."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from anatomical_embedding.cli.app import main
from anatomical_embedding.training.checkpoints import load_checkpoint
from anatomical_embedding.training.config import load_run_config
from anatomical_embedding.training.engine import Trainer

from fixtures_data import write_training_manifest

#: The test_training SMALL AEFM, in-process (no deterministic-algorithm switch: it is process-global).
SMALL = [
    "method.widths=[4,8,16,32]", "method.feature_dim=8", "method.spacing=[8.0,8.0,8.0]",
    "method.patch_size=[32,32,32]", "method.n_pos=64", "method.n_neg=256", "method.epochs_region=0",
    "train.lr=1e-3", "train.num_workers=0", "train.log_every=1", "train.progress_bar=false",
    "train.tensorboard=false", "train.threads=1",
]


@pytest.fixture(scope="module")
def small_data(phantom_cohort, held_out_ids, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    return write_training_manifest(phantom_cohort, held_out_ids, root / "train.json")


@pytest.fixture(scope="module")
def four_step_run(small_data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("four") / "run"
    cfg = load_run_config("aefm", None, SMALL + ["train.max_steps=4", "train.ckpt_every=2", "train.keep_last=3"])
    assert Trainer(cfg, small_data, run, echo_progress=False).run() == 0
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same_weights(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_falls_back_past_a_truncated_last_checkpoint(four_step_run, small_data, tmp_path, caplog, capsys):
    """train --resume with a truncated last.pt -> a warning naming it and the intact step_*.pt it resumes from; the result is bit-identical."""
    run = _copy(four_step_run, tmp_path / "run")
    ck = run / "checkpoints"
    expected = load_checkpoint(ck / "last.pt")
    _truncate(ck / "last.pt")
    _truncate(ck / "step_00000004.pt")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data", str(small_data), "--out", str(run), "--resume"]) == 0
    assert "last.pt is unreadable" in caplog.text and "resuming from" in caplog.text
    assert "step_00000002.pt" in caplog.text
    got = load_checkpoint(ck / "last.pt")
    assert got["step"] == 4 and _same_weights(got["model"], expected["model"])
    assert "Traceback" not in capsys.readouterr().err


def test_resume_with_no_intact_checkpoint_is_refused(four_step_run, small_data, tmp_path, capsys):
    """train --resume when every checkpoint is truncated -> exit 2, one line saying none is intact."""
    run = _copy(four_step_run, tmp_path / "run")
    for p in (run / "checkpoints").glob("*.pt"):
        _truncate(p)
    assert main(["train", "--data", str(small_data), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no intact checkpoint" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_export_of_truncated_checkpoint_names_the_intact_one(four_step_run, tmp_path, capsys):
    """export of a run whose last.pt is truncated -> exit 2 naming the intact checkpoint and --checkpoint N; no package."""
    run = _copy(four_step_run, tmp_path / "run")
    _truncate(run / "checkpoints" / "last.pt")
    out = tmp_path / "m.aemodel"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "last.pt is unreadable" in err and "step_00000004.pt" in err and "--checkpoint 4" in err
    assert "Traceback" not in err and not out.exists()


def test_resumed_run_stores_the_same_global_rng_states(four_step_run, small_data, tmp_path):
    """train --resume -> the checkpoints store the same global RNG states (python, numpy, torch) as an uninterrupted run."""
    run = _copy(four_step_run, tmp_path / "run")
    ck = run / "checkpoints"
    shutil.copyfile(ck / "step_00000002.pt", ck / "last.pt")  # as if killed right after step 2's checkpoint
    (ck / "step_00000004.pt").unlink()
    assert main(["train", "--data", str(small_data), "--out", str(run), "--resume"]) == 0
    a = load_checkpoint(four_step_run / "checkpoints" / "last.pt")["rng"][0]
    b = load_checkpoint(ck / "last.pt")["rng"][0]
    assert torch.equal(a["torch"], b["torch"])
    assert a["python"] == b["python"]
    assert torch.equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]


# ---- fault injection: SIGKILL at random points, checkpoint writes included, then --resume ------------------
#: Runs the train CLI; FAULT=save:N or FAULT=copy:N kills the process with SIGKILL half-way through the N-th
#: checkpoint write (torch.save of step_*.pt) or the N-th copy to last.pt/best.pt, leaving a half-written file.
_FAULTY_TRAIN = r"""
import os, shutil, signal, sys
import torch
kind, _, at = os.environ.get("FAULT", "none:0").partition(":")
calls = {"save": 0, "copy": 0}

def _die_half_written(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

def _wrap(name, real):
    def f(*args, **kwargs):
        out = real(*args, **kwargs)
        dst = args[1] if len(args) > 1 else kwargs.get("f", kwargs.get("dst"))
        if "checkpoints" in str(dst):  # not the preprocessing cache
            calls[name] += 1
            if kind == name and calls[name] == int(at):
                _die_half_written(dst)
        return out
    return f

torch.save = _wrap("save", torch.save)
shutil.copyfile = _wrap("copy", shutil.copyfile)
from anatomical_embedding.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train_proc(args: list[str], fault: str = "none:0"):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault}
    return subprocess.Popen([sys.executable, "-c", _FAULTY_TRAIN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")


def _finish(proc, timeout: float = 120) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _all_readable(run: Path) -> None:
    ck = run / "checkpoints"
    assert not list(ck.glob(".*")), "half-written temporaries left behind"
    for p in ck.glob("*.pt"):
        load_checkpoint(p)  # raises for an unreadable checkpoint


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(small_data, tmp_path):
    """SIGKILL during a checkpoint save, during the copy to last.pt, or at a random moment, then --resume -> weights bit-identical to the uninterrupted run, and every checkpoint readable."""
    import random
    import signal
    import time

    sets = []
    for s in SMALL + ["train.max_steps=6", "train.ckpt_every=2", "train.keep_last=2", "train.deterministic=true"]:
        sets += ["--set", s]
    new = ["--method", "aefm", "--data", str(small_data)]
    resume = ["--data", str(small_data), "--resume"]
    rng = random.Random(21)
    ref = tmp_path / "ref"
    chain = tmp_path / "chain"
    timed = tmp_path / "timed"
    procs = {"ref": _train_proc([*new, "--out", str(ref), *sets]),
             # Killed half-way through the 2nd or 3rd checkpoint save, then half-way through a later copy to last.pt.
             "chain": _train_proc([*new, "--out", str(chain), *sets], f"save:{rng.randint(2, 3)}"),
             "timed": _train_proc([*new, "--out", str(timed), *sets])}
    # The timed run: SIGKILL at a random moment after its first checkpoint (before it, there is nothing to resume).
    for line in procs["timed"].stdout:
        if '"event": "checkpoint"' in line:
            time.sleep(rng.uniform(0.0, 1.0))
            procs["timed"].send_signal(signal.SIGKILL)
            break
    for name in ("ref", "chain", "timed"):
        code, err = _finish(procs[name])
        assert code == (0 if name == "ref" else -signal.SIGKILL) or (name == "timed" and code == 0), (name, err[-2000:])
    code, err = _finish(_train_proc([*resume, "--out", str(chain)], f"copy:{rng.randint(1, 2)}"))
    assert code == -signal.SIGKILL, err[-2000:]
    for run in (chain, timed):
        code, err = _finish(_train_proc([*resume, "--out", str(run)]))
        assert code == 0, err[-2000:]
    expected = load_checkpoint(ref / "checkpoints" / "last.pt")
    for run in (chain, timed):
        got = load_checkpoint(run / "checkpoints" / "last.pt")
        assert got["step"] == 6 and _same_weights(got["model"], expected["model"]), run.name
        _all_readable(run)


def test_max_seconds_stops_with_a_checkpoint_and_resume_finishes(small_data, tmp_path):
    """train.max_seconds: the step under way finishes, a checkpoint is saved, the run ends as a stop (130) well
    before max_steps; --resume with the budget lifted finishes the run from that step."""
    import json

    run = tmp_path / "run"
    cfg = load_run_config("aefm", None, SMALL + ["train.max_steps=400", "train.ckpt_every=400", "train.max_seconds=0.5"])
    assert Trainer(cfg, small_data, run, echo_progress=False).run() == 130
    events = [json.loads(x) for x in (run / "progress.jsonl").read_text().splitlines() if x.startswith("{")]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "TIME_LIMIT"
    step = stopped[0]["step"]
    assert 1 <= step < 400 and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step
    finish = load_run_config("aefm", None, SMALL + ["train.max_steps=" + str(step + 2), "train.ckpt_every=400"])
    assert Trainer(finish, small_data, run, resume=True, echo_progress=False).run() == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step + 2
