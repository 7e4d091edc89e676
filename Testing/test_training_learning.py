"""Learning is real: a short CPU pretraining of a tiny AEFM on phantoms gives embeddings whose
nearest-neighbour landmark matching between held-out subjects beats the same network at random
initialisation (>= 30 % lower mean error) and matching by identical world coordinate."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from anatomical_embedding.data.datasets import PreprocessConfig, preprocess_volume
from anatomical_embedding.io import pad_to_multiple, read_image
from fixtures_data import trained_vs_random


def embed_subject(embedder, subject, spacing):
    """(features (C, k, j, i) on the preprocessed grid, preprocessed Volume).

    The features are the fine map concatenated with the coarse map (trilinearly upsampled, unit
    length), so a dot product is fine + coarse cosine similarity: coarse to fine in one argmax.
    """
    vol, _ = preprocess_volume(read_image(subject.image_path), PreprocessConfig(spacing=tuple(spacing), preset="ct_aefm"))
    padded, _ = pad_to_multiple(vol, embedder.size_multiple, value=float(vol.array.min()))
    with torch.no_grad():
        coarse, fine = embedder(torch.from_numpy(padded.array)[None, None])
        coarse = torch.nn.functional.normalize(
            torch.nn.functional.interpolate(coarse, size=fine.shape[2:], mode="trilinear"), dim=1)
    return torch.cat([fine, coarse], dim=1)[0], padded


def match_errors(embedder, subjects, spacing) -> list[float]:
    """NN matching errors (mm) for every landmark of every ordered subject pair (similarity argmax)."""
    embedded = {s.id: embed_subject(embedder, s, spacing) for s in subjects}
    errors = []
    for a, b in itertools.permutations(subjects, 2):
        fa, va = embedded[a.id]
        fb, vb = embedded[b.id]
        flat_b = fb.reshape(fb.shape[0], -1)
        for name, pa in a.landmarks.items():
            i, j, k = np.rint(va.world_to_index(np.asarray(pa)[None], "LPS")[0]).astype(int)
            k, j, i = (int(np.clip(v, 0, s - 1)) for v, s in zip((k, j, i), fa.shape[1:]))
            best = int(torch.argmax(fa[:, k, j, i] @ flat_b))
            kb, jb, ib = np.unravel_index(best, fb.shape[1:])
            pred = vb.index_to_world(np.array([[ib, jb, kb]], dtype=float), "LPS")[0]
            errors.append(float(np.linalg.norm(pred - np.asarray(b.landmarks[name]))))
    return errors


@pytest.mark.slow
def test_pretraining_beats_random_init_and_identity(trained_aefm_run, phantom_cohort, held_out_ids):
    subjects = [s for s in phantom_cohort.subjects if s.id in held_out_ids]
    check = trained_vs_random(trained_aefm_run, subjects, errors=lambda e, subs, sp, _preset: match_errors(e, subs, sp))
    assert check["info"]["method"] == "aefm" and check["info"]["step"] > 0
    assert check["trained"] <= 0.7 * check["random"]
    assert check["trained"] < check["identity"]


@pytest.mark.slow
def test_paper_objective_queue_only_negatives_learns(phantom_cohort, held_out_ids, tmp_path):
    """AEFM as published: L_AC against the queue alone (no in-image negatives), scaled down. The momentum is 0.99
    (time constant 100 steps for a 200-step run, as the paper's 0.999 is for its long runs).

    Measured 2026-12-06 (train seed 0): mean error trained 20.4 mm, random init 152.2 mm, identical coordinates
    24.7 mm (ratio 0.83); the paper's own 0.999 at 300 steps: 21.5 mm (0.87). Training takes ~50 s on 2 idle
    cores. Asserted with margin: < 0.92 x identical coordinates and < 0.3 x random init.
    """
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer
    from fixtures_data import TINY_AEFM_OVERRIDES, write_training_manifest

    manifest = write_training_manifest(phantom_cohort, held_out_ids, tmp_path / "train.json")
    cfg = load_run_config("aefm", None, TINY_AEFM_OVERRIDES + [
        "method.in_image_negatives=false", "method.momentum=0.99", "train.max_steps=200", "train.ckpt_every=200"])
    assert not cfg.method_config.in_image_negatives
    run = tmp_path / "run"
    assert Trainer(cfg, manifest, run, echo_progress=False).run() == 0
    subjects = [s for s in phantom_cohort.subjects if s.id in held_out_ids]
    check = trained_vs_random(run, subjects, errors=lambda e, subs, sp, _preset: match_errors(e, subs, sp))
    assert check["trained"] < 0.92 * check["identity"]
    assert check["trained"] < 0.3 * check["random"]
