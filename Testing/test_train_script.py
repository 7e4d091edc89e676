"""``AnatomicalEmbeddingTrainerLib/train.py``: help generated from the config defaults, a tiny run in a subprocess
(progress lines, checkpoint, exported package that the matching code loads) and the documented exit codes."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "AnatomicalEmbeddingTrainer" / "AnatomicalEmbeddingTrainerLib" / "train.py"
#: The documented path of a source checkout (a compatibility launcher, not installed).
COMPAT_TRAIN_PY = ROOT / "AnatomicalEmbeddingTrainer" / "train.py"
TINY = ["method.widths=[8,16,32,64]", "method.feature_dim=8", "method.spacing=[8.0,8.0,8.0]",
        "method.patch_size=[32,32,32]", "method.n_pos=50", "method.n_neg=512", "method.epochs_region=0",
        "train.batch_size=2", "train.num_workers=0", "train.progress_bar=false", "train.tensorboard=false"]


def run_train(*args: str, timeout: float = 300, env_extra: dict | None = None, python_args=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *python_args, str(TRAIN_PY), *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from anatomical_embedding.phantoms import generate_cohort

    root = tmp_path_factory.mktemp("train_script_cohort")
    generate_cohort(root / "cohort", 3, seed=4, spacing=8.0, size=40, workers=1)
    return root / "cohort"


@pytest.fixture
def train_module(monkeypatch):
    """train.py imported as a module (its main() is called in-process where a subprocess is not needed)."""
    spec = importlib.util.spec_from_file_location("_train_script", TRAIN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_lists_every_setting_with_its_default_and_the_exit_codes(train_module, capsys):
    from anatomical_embedding.methods import available_methods, get_method
    from anatomical_embedding.training.config import TrainConfig

    with pytest.raises(SystemExit) as exc:
        train_module.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for section, cls in [("train", TrainConfig)] + [("method", get_method(m).Config) for m in available_methods()]:
        for f in dataclasses.fields(cls):
            d = f.default
            shown = ("true" if d else "false") if isinstance(d, bool) else json.dumps(d) if isinstance(d, str) else \
                "[" + ",".join(repr(v) for v in d) + "]" if isinstance(d, tuple) else repr(d)
            assert f"{section}.{f.name}={shown}" in text, f"{section}.{f.name} missing or wrong default in --help"
    for code in ("0 finished", "2 bad input", "3 CUDA requested", "4 GPU out of memory", "130 stopped"):
        assert code in text
    assert "--export" in text and "--resume" in text and "--method finetune" in text and "--init-from" in text


def test_finds_the_engine_in_a_source_checkout_without_install():
    """With the editable install hidden, train.py adds ../AnatomicalEmbedding to sys.path itself."""
    engine = str(ROOT / "AnatomicalEmbedding")
    code = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != %r]; "
            "sys.argv = [%r, '--help']; runpy.run_path(%r, run_name='__main__')" % (engine, str(TRAIN_PY), str(TRAIN_PY)))
    check = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != {engine!r}]\n"
                            "try:\n import anatomical_embedding\nexcept ImportError:\n print('hidden')"],
                           capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert check.stdout.strip() == "hidden"  # the test really hides the engine
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd="/")
    assert res.returncode == 0, res.stderr
    assert "train.batch_size=2" in res.stdout


@pytest.mark.slow  # training + ONNX export + embedding two volumes (~25 s on a shared 2-core CPU)
def test_tiny_run_writes_progress_checkpoint_and_a_package_the_matcher_loads(tiny_cohort, tmp_path):
    from anatomical_embedding import io
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import embed_volume
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.phantoms import load_cohort

    run, package = tmp_path / "run", tmp_path / "tiny.aemodel"
    res = run_train("--method", "aefm", "--data", str(tiny_cohort), "--out", str(run), "--export", str(package),
                    "--device", "cpu", *sets(TINY + ["train.max_steps=4", "train.log_every=2", "train.ckpt_every=2"]))
    assert res.returncode == 0, res.stderr[-2000:]
    evs = events(res.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "exported"]
    progress = [e for e in evs if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [2, 4] and all(np.isfinite(e["loss"]) for e in progress)
    assert set(progress[0]["terms"]) == {"ac_local", "ac_global"}
    assert [e["step"] for e in evs if e["event"] == "checkpoint"] == [2, 4]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "progress.jsonl").is_file()
    assert Path(evs[-1]["path"]) == package and package.is_file()

    # The package opens in the inference backend, agrees with the run's torch weights, and the matcher uses it.
    model, torch_model = open_model(package), open_model(run, backend="torch")
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
    for a, b in zip(model.embed_patch(x), torch_model.embed_patch(x)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    subjects = load_cohort(tiny_cohort).subjects
    src, tgt = (io.read_image(s.image_path) for s in subjects[:2])
    matcher = Matcher(embed_volume(model, src), embed_volume(model, tgt), prior_config=None)
    name, point = next(iter(subjects[0].landmarks.items()))
    match = matcher.match(np.asarray(point), names=[name])[0].raw
    ijk = tgt.world_to_index(match.point_lps[None], "LPS")[0]
    assert np.all(ijk > -0.5) and np.all(ijk < np.array(tgt.array.shape[::-1]) - 0.5)  # inside the target
    assert -1.0 <= match.similarity <= 1.0 + 1e-5


def test_empty_data_folder_exits_2_with_a_clear_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_train("--method", "aefm", "--data", str(empty), "--out", str(tmp_path / "run"), "--device", "cpu",
                    *sets(TINY + ["train.max_steps=2"]), timeout=120)
    assert res.returncode == 2
    assert f"no images found in {empty}" in res.stderr
    assert events(res.stdout)[-1]["event"] == "error" and events(res.stdout)[-1]["exit_code"] == 2


def test_other_bad_inputs_exit_2(train_module, tmp_path, capsys):
    args = ["--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_module.main([*args, "--set", "train.bogus=1"]) == 2
    assert "unknown setting(s) train.bogus" in capsys.readouterr().err
    package = tmp_path / "exists.aemodel"
    package.write_bytes(b"")
    # Refused before training, so that a long run does not end in a refused export.
    assert train_module.main([*args, "--export", str(package)]) == 2
    assert "exists; choose another file name" in capsys.readouterr().err
    assert train_module.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "config.toml not found" in capsys.readouterr().err


def test_export_only_refuses_what_it_cannot_export_exit_2(train_module, tmp_path, capsys):
    """``--export-only`` (the Trainer's Export model) needs no --data, and refuses with exit 2 and one line: a folder
    that is no run, a run without a checkpoint, a finetune run, an existing package (unless --overwrite) and a run
    folder that another process trains (it takes the run folder's lock), writing no package."""
    from anatomical_embedding.training.config import load_run_config, save_run_config
    from lock_holder import hold_run_folder

    run, package = tmp_path / "run", tmp_path / "run" / "run.aemodel"
    args = ["--out", str(run), "--export-only", "--export", str(package)]
    assert train_module.main(args) == 2
    assert f"{run} is not a training run folder (no config.toml)" in capsys.readouterr().err
    run.mkdir()
    save_run_config(load_run_config("aefm", None, []), run / "config.toml")
    assert train_module.main(args) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    with hold_run_folder(run) as holder:
        assert train_module.main(args) == 2
    assert f"{run} is being trained by process {holder.pid}" in capsys.readouterr().err
    package.write_bytes(b"an earlier export")
    assert train_module.main(args) == 2
    assert f"--export: {package} exists; choose another file name, delete it or add --overwrite" in \
        capsys.readouterr().err
    assert package.read_bytes() == b"an earlier export"
    (run / "config.toml").write_text('method = "finetune"\n[train]\n[config]\n', encoding="utf-8")
    assert train_module.main([*args, "--overwrite"]) == 2
    assert "a finetune run is applied with `anatomical-embedding segment" in capsys.readouterr().err
    assert train_module.main([*args, "--method", "aefm"]) == 2
    assert "leave out --method and --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # training still needs --data
        train_module.main(["--method", "aefm", "--out", str(run)])
    assert err.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err


def test_cuda_requested_but_unavailable_exits_3(train_module, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = train_module.main(["--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                              "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 3
    assert "CUDA was requested (train.device=cuda) but no CUDA GPU is available" in err and "--device cpu" in err


def test_gpu_out_of_memory_exits_4_with_a_suggestion(train_module, tmp_path, monkeypatch, capsys):
    import torch

    from anatomical_embedding.training import engine

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.Trainer, "run", oom)
    code = train_module.main(["--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                              "--set", "train.batch_size=4"])
    out = capsys.readouterr()
    assert code == 4
    assert "GPU out of memory" in out.err and "batch size 4 per GPU and patch size [96, 96, 96]" in out.err
    assert "--set method.patch_size=[64,64,64]" in out.err  # a concrete smaller patch (multiple of 16)
    assert events(out.out)[-1] == {**events(out.out)[-1], "event": "error", "exit_code": 4}


def test_unexpected_error_exits_1(train_module, tmp_path, monkeypatch, capsys):
    from anatomical_embedding.training import engine

    monkeypatch.setattr(engine.Trainer, "run", lambda self: 1 / 0)
    code = train_module.main(["--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 1 and "ZeroDivisionError" in capsys.readouterr().err


def test_print_config_resolves_file_overrides_and_device(train_module, tmp_path, capsys):
    import tomllib

    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "aefm"\n[train]\nlr = 0.5\n[config]\nn_pos = 7\n', encoding="utf-8")
    code = train_module.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg),
                              "--set", "method.n_pos=9", "--device", "cpu", "--print-config"])
    data = tomllib.loads(capsys.readouterr().out)
    assert code == 0 and data["method"] == "aefm"
    assert data["train"]["lr"] == 0.5 and data["train"]["device"] == "cpu" and data["config"]["n_pos"] == 9
    assert not (tmp_path / "run").exists()  # nothing trained or written


def test_more_processes_than_gpus_exits_3(train_module, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    code = train_module.main(["--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 3 and "LOCAL_RANK 2 has no GPU: only 2 visible" in capsys.readouterr().err


def test_finetune_goes_through_the_same_script(train_module, tiny_cohort, tmp_path, capsys):
    import tomllib

    code = train_module.main(["--method", "finetune", "--mode", "scratch", "--data", str(tiny_cohort),
                              "--out", str(tmp_path / "seg"), "--print-config"])
    data = tomllib.loads(capsys.readouterr().out)
    assert code == 0 and data["method"] == "finetune" and data["config"]["mode"] == "scratch"
    assert data["train"]["optimizer"] == "adam" and data["train"]["lr"] == 1e-4  # AEFM's downstream recipe
    assert data["config"]["class_names"][0] == "background" and "liver" in data["config"]["class_names"]
    # Finetune-only options without --method finetune, and --export of a segmentation run, are refused.
    assert train_module.main(["--method", "aefm", "--mode", "scratch", "--data", str(tiny_cohort),
                              "--out", str(tmp_path / "x")]) == 2
    assert train_module.main(["--method", "finetune", "--mode", "scratch", "--data", str(tiny_cohort),
                              "--out", str(tmp_path / "y"), "--export", str(tmp_path / "y.aemodel")]) == 2
    assert "anatomical-embedding segment" in capsys.readouterr().err


# ---- one training process per run folder (defect: a second process trained the same folder) ----------------
def test_refuses_a_run_folder_that_a_live_process_trains(train_module, tmp_path, capsys):
    """Plain ``python train.py`` on a folder another live process trains: exit 2 with one line naming the process
    and the fix, before anything is written into the folder."""
    from lock_holder import hold_run_folder

    run = tmp_path / "run"
    with hold_run_folder(run) as holder:
        code = train_module.main(["--method", "aefm", "--data", str(tmp_path), "--out", str(run), "--device", "cpu"])
    out = capsys.readouterr()
    message = f"{run} is being trained by process {holder.pid} (started "
    assert code == 2 and f"error: {message}" in out.err and "; stop it or choose another run folder" in out.err
    assert events(out.out)[-1]["exit_code"] == 2 and events(out.out)[-1]["message"].startswith(message)
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # no config.toml, progress.jsonl, checkpoints


@pytest.mark.slow  # torchrun and two ranks importing torch (~25 s on a shared 2-core CPU)
@pytest.mark.ddp
def test_torchrun_ranks_all_refuse_a_run_folder_a_live_process_trains(tmp_path):
    """Under torchrun only rank 0 takes the lock; the ranks agree on the outcome, so every rank exits with the
    error (none waits in a collective for a rank 0 that gave up) and rank 0 reports it once."""
    from lock_holder import hold_run_folder

    run = tmp_path / "run"
    with hold_run_folder(run) as holder:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(TRAIN_PY), "--method", "aefm", "--data", str(tmp_path), "--out", str(run),
                              "--device", "cpu", *sets(TINY)], capture_output=True, text=True, encoding="utf-8",
                             errors="replace", timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    [error] = [e for e in events(res.stdout) if e["event"] == "error"]
    assert error["exit_code"] == 2 and f"is being trained by process {holder.pid} (started " in error["message"]
    assert "rank 0 could not lock the run folder" in res.stderr, res.stderr[-3000:]  # rank 1 stopped by itself
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]


# ---- every path exits with its documented code (defect: a windowless Slicer never quit) ---------------------
BLOCK_TORCH = ("import sys, importlib.abc\n"
               "class _Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'monai'):\n"
               "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
               "sys.meta_path.insert(0, _Block())\n")
FAKE_SLICER = ("import types\n"
               "exits = []\n"
               "slicer = types.ModuleType('slicer')\n"
               "slicer.app = types.SimpleNamespace(commandOptions=lambda: types.SimpleNamespace(noMainWindow=True))\n"
               "slicer.util = types.SimpleNamespace(exit=lambda code: exits.append(code))\n"
               "sys.modules['slicer'] = slicer\n")


def run_as_slicer_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """``Slicer --no-main-window --python-script script args`` as far as the script sees it: ``slicer.app`` with
    ``noMainWindow`` and ``slicer.util.exit`` (recorded and printed instead of quitting), torch blocked."""
    code = (BLOCK_TORCH + FAKE_SLICER + "import runpy\n"
            f"sys.argv = [{str(script)!r}, *{list(args)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "except BaseException as exc:\n"
            "    print('ESCAPED', type(exc).__name__, exc)\n"
            "print('SLICER_EXIT', exits)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("script", [TRAIN_PY, COMPAT_TRAIN_PY], ids=["train.py", "compat path"])
def test_headless_slicer_command_exits_on_an_early_error(script, tmp_path):
    """torch missing: the help/parser still builds, training fails, and Slicer is asked to quit with code 1 (the
    exception never escapes the script, which would leave a ``--no-main-window`` Slicer running)."""
    res = run_as_slicer_script(script, "--method", "aefm", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert "ESCAPED" not in res.stdout, res.stdout + res.stderr
    assert "SLICER_EXIT [1]" in res.stdout, res.stdout + res.stderr[-2000:]
    error = [e for e in events(res.stdout) if e.get("event") == "error"]
    assert error and error[-1]["exit_code"] == 1 and "torch" in error[-1]["message"]
    # --help without torch: prints (naming what is missing) and exits 0; bad arguments exit 2.
    res = run_as_slicer_script(script, "--help")
    assert "SLICER_EXIT [0]" in res.stdout and "install PyTorch" in res.stdout, res.stdout + res.stderr[-2000:]
    res = run_as_slicer_script(script, "--no-such-option")
    assert "SLICER_EXIT [2]" in res.stdout, res.stdout + res.stderr[-2000:]
