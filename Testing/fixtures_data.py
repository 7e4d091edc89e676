"""Phantom cohort and tiny trained model fixtures (see conftest.py).

* ``phantom_cohort`` (session): 10 phantom subjects at ~4-6 mm (at most 64 voxels per side), generated
  with the phantom API into a temporary folder; a ``phantoms.Cohort``.
* ``held_out_ids`` (session): ids of the subjects no model trains on (the last ``N_HELD_OUT``).
* ``trained_aefm_run`` (session): ``RUN_DIR`` of a tiny AEFM trained for about a minute on CPU on the
  other subjects (anatomical contrastive stage only; 300 steps, about 80 s on 2 idle cores). Load it with
  ``anatomical_embedding.training.checkpoints.load_embedder_from_run(run)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

N_SUBJECTS = 10
N_HELD_OUT = 3
COHORT_SEED = 7

#: Tiny AEFM used by the fixture (and the learning test): settings as ``--set`` overrides.
TINY_AEFM_OVERRIDES = [
    # Small net at 8 mm: a 32^3 patch sees most of the phantom's abdomen, so context is learnt quickly.
    # Width is what makes 300 steps learn cross-subject correspondence (held-out landmark mean error,
    # 2026-12-01: widths 4-32 26.4 mm, 8-64 20.2, 16-128 16.3, 32-256 16.5 at 1.7x the time; identity 24.7).
    "method.widths=[16,32,64,128]", "method.feature_dim=16", "method.spacing=[8.0,8.0,8.0]",
    # Our addition: each point also contrasts with the other points of its own patch pair (16.3 vs 18.4 mm
    # with the paper's queue-only negatives, whose keys all come from other images at this queue size).
    "method.in_image_negatives=true",
    "method.patch_size=[32,32,32]", "method.n_pos=200", "method.n_neg=1024", "method.temperature=0.2",
    # A short run: a faster momentum encoder than the paper's 0.999 (whose time constant is 1000 steps).
    "method.momentum=0.9", "method.epochs_region=0",
    "train.batch_size=2", "train.max_steps=300", "train.lr=3e-3", "train.warmup_steps=10",
    "train.num_workers=0", "train.log_every=25", "train.ckpt_every=150", "train.progress_bar=false",
    "train.tensorboard=false", "train.seed=0",
]


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    from anatomical_embedding.phantoms import generate_cohort, load_cohort

    root = tmp_path_factory.mktemp("phantom_cohort")
    manifest = generate_cohort(root / "cohort", N_SUBJECTS, seed=COHORT_SEED, spacing=4.0, size=64, workers=2)
    return load_cohort(manifest)


@pytest.fixture(scope="session")
def held_out_ids(phantom_cohort) -> list[str]:
    return [s.id for s in phantom_cohort.subjects[-N_HELD_OUT:]]


def write_training_manifest(cohort, exclude: list[str], path: Path, with_labels: bool = False) -> Path:
    """A data manifest (``{"cases": [...]}``) of the cohort's subjects except ``exclude``."""
    cases = []
    for s in cohort.subjects:
        if s.id in exclude:
            continue
        case = {"id": s.id, "image": str(s.image_path)}
        if with_labels:
            case["label"] = str(s.label_path)
        cases.append(case)
    path.write_text(json.dumps({"cases": cases}, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_aefm_run(tmp_path_factory, phantom_cohort, held_out_ids) -> Path:
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer

    reuse = os.environ.get("AE_TEST_REUSE_AEFM_RUN")
    if reuse:  # local iteration only (a run trained earlier; accuracy assertions need the full 300 steps)
        return Path(reuse)
    root = tmp_path_factory.mktemp("aefm_run")
    manifest = write_training_manifest(phantom_cohort, held_out_ids, root / "train.json")
    cfg = load_run_config("aefm", None, TINY_AEFM_OVERRIDES)
    run = root / "run"
    rc = Trainer(cfg, manifest, run).run()
    assert rc == 0
    return run


def nn_landmark_errors(embedder, subjects, spacing, preset) -> list[float]:
    """Nearest-neighbour landmark matching error (mm) over ordered subject pairs: each source landmark's fine
    embedding, cosine argmax over the whole target. The learning tests of every method use this one check."""
    import itertools

    import numpy as np
    import torch
    from anatomical_embedding.data.datasets import PreprocessConfig, preprocess_volume
    from anatomical_embedding.io import pad_to_multiple, read_image

    embedded = {}
    for s in subjects:
        vol, _ = preprocess_volume(read_image(s.image_path), PreprocessConfig(spacing=tuple(spacing), preset=preset))
        padded, _ = pad_to_multiple(vol, embedder.size_multiple, value=float(vol.array.min()))
        with torch.no_grad():
            embedded[s.id] = (embedder(torch.from_numpy(padded.array)[None, None])[1][0], padded)
    errors = []
    for a, b in itertools.permutations(subjects, 2):
        (fa, va), (fb, vb) = embedded[a.id], embedded[b.id]
        flat_b = fb.reshape(fb.shape[0], -1)
        for name, pa in a.landmarks.items():
            i, j, k = np.rint(va.world_to_index(np.asarray(pa)[None], "LPS")[0]).astype(int)
            k, j, i = (int(np.clip(v, 0, n - 1)) for v, n in zip((k, j, i), fa.shape[1:]))
            kb, jb, ib = np.unravel_index(int(torch.argmax(fa[:, k, j, i] @ flat_b)), fb.shape[1:])
            pred = vb.index_to_world(np.array([[ib, jb, kb]], dtype=float), "LPS")[0]
            errors.append(float(np.linalg.norm(pred - np.asarray(b.landmarks[name]))))
    return errors


def identity_landmark_errors(subjects) -> list[float]:
    """Errors (mm) of "matching" by identical world coordinates, over the same ordered pairs as the checks."""
    import itertools

    import numpy as np

    return [float(np.linalg.norm(np.asarray(a.landmarks[n]) - np.asarray(b.landmarks[n])))
            for a, b in itertools.permutations(subjects, 2) for n in a.landmarks]


def step0_embedder(run: Path):
    """The run's network at its step-0 weights: the engine seeds torch with ``train.seed`` before building."""
    import torch
    from anatomical_embedding.training.checkpoints import build_embedder
    from anatomical_embedding.training.config import read_run_config

    cfg = read_run_config(run / "config.toml")
    torch.manual_seed(cfg.train.seed)
    return build_embedder(cfg.method, cfg.to_dict()["config"]).eval()


def trained_vs_random(run: Path, subjects, errors=None) -> dict:
    """Mean held-out landmark error (mm) of the trained run, of the same network at step 0, and of identical
    world coordinates; ``errors(embedder, subjects, spacing, preset)`` defaults to :func:`nn_landmark_errors`.
    Also returns both embedders and the run's model info for further checks."""
    import numpy as np
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    errors = errors or nn_landmark_errors
    trained, info = load_embedder_from_run(run)
    random_init = step0_embedder(run)
    spacing, preset = info["spacing"], info["intensity_preset"]["name"]
    out = {"trained": float(np.mean(errors(trained, subjects, spacing, preset))),
           "random": float(np.mean(errors(random_init, subjects, spacing, preset))),
           "identity": float(np.mean(identity_landmark_errors(subjects)))}
    print(f"{info['method']} mean landmark error (mm): trained {out['trained']:.1f}, random init "
          f"{out['random']:.1f}, identical coordinate {out['identity']:.1f}")
    return {**out, "trained_embedder": trained, "random_embedder": random_init, "info": info}


def copy_package_with_card(package: Path, out: Path, **card_fields) -> list[str]:
    """Copy a ``.aemodel`` member by member with ``card_fields`` written into its card.json (no sidecar);
    returns the member names. Tests use it to show that an edited card is caught."""
    import zipfile

    with zipfile.ZipFile(package) as zf, zipfile.ZipFile(out, "w") as dst:
        for name in zf.namelist():
            payload = zf.read(name)
            if name == "card.json":
                payload = json.dumps({**json.loads(payload), **card_fields}).encode()
            dst.writestr(name, payload)
        return zf.namelist()
