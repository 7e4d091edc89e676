"""HDSSL method (Kats et al.): registered balanced projections, sampling, eq. (1)/(2) against hand computations,
configs, the dense embedder, and (slow) a short CPU pretraining that beats random initialisation on phantom
landmark matching, the ``train`` CLI end to end, and ONNX export parity of the trained embedder."""
from __future__ import annotations

from dataclasses import replace

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anatomical_embedding.methods import get_method
from anatomical_embedding.methods.base import StepContext
from anatomical_embedding.losses import hdssl_info_nce
from anatomical_embedding.methods.hdssl import (
    HDSSLMethod,
    HDSSLMethodConfig,
    points_to_layout,
)
from fixtures_data import trained_vs_random, write_training_manifest

CTX = StepContext(step=0, epoch=0, total_steps=1)


def tiny_config(**kw) -> HDSSLMethodConfig:
    base = dict(base_channels=4, num_scales=3, scale_proj_channels=4, proj_dim=8, coarse_level=1,
                patch_size=(16, 12, 8), n_pos=20)
    base.update(kw)
    return HDSSLMethodConfig(**base)


def _volume(seed: int = 0, shape=(20, 24, 28)) -> torch.Tensor:
    """A smooth random volume in [0, 1] (k, j, i) with a dark border (background)."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    x = (x - x.min()) / (x.max() - x.min())
    x[:2], x[:, :2], x[:, :, :2] = 0.05, 0.05, 0.05
    return torch.from_numpy(x.astype(np.float32))


def _batch(method: HDSSLMethod, n: int = 2, seed: int = 0) -> dict:
    samples = [method.make_sample({"image": _volume(s)}, np.random.default_rng([seed, s]), 0) for s in range(n)]
    return method.collate(samples)


# ---- network --------------------------------------------------------------------------------------------
def test_projections_are_registered_saved_and_trained():
    torch.manual_seed(0)
    method = HDSSLMethod(tiny_config())
    keys = method.state_dict().keys()
    for level in range(3):
        assert f"net.scale_proj.{level}.weight" in keys
    params = dict(method.named_parameters())
    proj = {k: v for k, v in params.items() if k.startswith("net.scale_proj.")}
    assert len(proj) == 3 + 1  # a weight per level, bias only at level 0 (published pattern)
    before = {k: v.detach().clone() for k, v in proj.items()}
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    loss, terms = method.train()(_batch(method), CTX)
    assert torch.isfinite(loss) and set(terms) == {"contrastive", "restorative"}
    opt.zero_grad()
    loss.backward()
    for name, p in proj.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in proj.items():
        assert not torch.equal(p.detach(), before[name]), name
    # They come back from a state_dict round trip (a plain list would lose them).
    clone = HDSSLMethod(tiny_config())
    clone.load_state_dict(method.state_dict())
    assert torch.equal(clone.net.scale_proj[2].weight, method.net.scale_proj[2].weight)


def test_architecture_options_hdssl_and_vox2vec_depths():
    hd = HDSSLMethod(HDSSLMethodConfig())  # published: 32 channels, 5 scales, 5 x 32 = 160-d voxel vector
    assert hd.net.backbone.level_channels == [32, 64, 128, 256, 512]
    assert [m.out_channels for m in hd.net.scale_proj] == [32] * 5
    assert hd.net.proj_head[0].in_features == 160 and hd.net.proj_head[6].out_features == 128
    emb = hd.embedder()
    assert (emb.fine_channels, emb.coarse_channels, emb.coarse_stride, emb.size_multiple) == (160, 64, 8, 16)
    v2v = HDSSLMethod(HDSSLMethodConfig(base_channels=16, num_scales=6, patch_size=(128, 128, 64)))
    assert v2v.net.backbone.level_channels == [16, 32, 64, 128, 256, 512]
    assert v2v.net.proj_head[0].in_features == 192
    # Reconstruction head: two convolutions (paper) or the published single 1x1x1 conv.
    convs = [m for m in hd.net.rest_head.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 2 and convs[0].in_channels == 32 and convs[-1].out_channels == 1
    lin = HDSSLMethod(tiny_config(rest_head="linear"))
    assert isinstance(lin.net.rest_head, torch.nn.Conv3d)
    with pytest.raises(ValueError, match="multiples of 4"):
        HDSSLMethod(tiny_config(patch_size=(16, 12, 6)))
    with pytest.raises(ValueError, match="modality"):
        HDSSLMethod(tiny_config(modality="pet"))


def test_preprocessing_follows_the_modality():
    ct = HDSSLMethod.preprocess_config(HDSSLMethodConfig())
    assert ct.spacing == (1.0, 1.0, 2.0) and ct.preset == "ct_hdssl" and ct.min_size == (128, 128, 32)
    mri = HDSSLMethod.preprocess_config(HDSSLMethodConfig(modality="mri"))
    assert mri.spacing == (1.5, 1.5, 1.5) and mri.preset == "mri_percentile"
    own = HDSSLMethod.preprocess_config(HDSSLMethodConfig(modality="mri", spacing=(6.0,), preset="ct_hdssl"))
    assert own.spacing == (6.0, 6.0, 6.0) and own.preset == "ct_hdssl"
    from anatomical_embedding.io import get_preset

    p = get_preset("ct_hdssl")
    np.testing.assert_allclose(p.apply(np.array([-2000.0, -1350.0, -175.0, 1000.0, 3000.0])),
                               [0.0, 0.0, 0.5, 1.0, 1.0])


def test_ct_is_cropped_to_the_body_above_minus_500_hu():
    # HDSSL §3.1: each CT is cropped to the box of its voxels above -500 HU before resampling.
    from anatomical_embedding.data.datasets import preprocess_volume
    from anatomical_embedding.io import Volume

    assert HDSSLMethod.preprocess_config(HDSSLMethodConfig()).body_crop_hu == -500.0
    assert HDSSLMethod.preprocess_config(HDSSLMethodConfig(modality="mri")).body_crop_hu is None
    assert HDSSLMethod.preprocess_config(HDSSLMethodConfig(body_crop=False)).body_crop_hu is None
    hu = np.full((20, 30, 40), -1000.0, np.float32)  # (k, j, i): air around a "body"
    hu[5:12, 8:20, 10:31] = 40.0
    hu[2, 2, 2] = -600.0  # the table / noise below the threshold does not count
    label = np.zeros(hu.shape, np.int16)
    label[6:8, 9:11, 12:14] = 1
    vol = Volume(hu, spacing=(1.0, 1.0, 2.0), origin=(3.0, -4.0, 5.0))
    cfg = replace(HDSSLMethod.preprocess_config(HDSSLMethodConfig()), min_size=(0, 0, 0))
    out, lab = preprocess_volume(vol, cfg, vol.with_array(label))
    assert out.array.shape == (7, 12, 21)  # the body's box, k j i
    np.testing.assert_allclose(out.origin, vol.index_to_world(np.array([10.0, 8.0, 5.0])))  # world kept
    assert int(lab.array.sum()) == 8 and lab.array.shape == out.array.shape
    # Off: the whole field of view.
    full, _ = preprocess_volume(vol, replace(cfg, body_crop_hu=None))
    assert full.array.shape == hu.shape
    # The crop is part of the cache key.
    assert replace(cfg, body_crop_hu=None).key() != cfg.key()


def test_toml_sets_the_paper_defaults():
    from anatomical_embedding.training.config import load_run_config

    toml = Path(__file__).parents[1] / "Resources" / "configs" / "hdssl.toml"
    cfg = load_run_config(None, toml, [])
    assert cfg.method == "hdssl" and get_method("hdssl") is HDSSLMethod
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps) == ("adam", 3e-4, 10, 50000)
    assert cfg.method_config == HDSSLMethodConfig()  # the file restates the dataclass defaults
    c = cfg.method_config
    assert (c.temperature, c.rest_weight, c.n_pos, c.proj_dim) == (0.1, 10.0, 1000, 128)
    assert (c.shuffle_prob, c.nonlinear_prob, c.paint_prob, c.outpaint_share) == (0.8, 0.9, 0.9, 0.2)


# ---- sampling -------------------------------------------------------------------------------------------
def test_points_to_layout_moves_like_the_array():
    method = HDSSLMethod(tiny_config())
    rng = np.random.default_rng(0)
    arr = rng.random((8, 12, 16))
    pts = np.stack([rng.integers(0, s, 30) for s in arr.shape], axis=1)
    net = method.layout.to_network(arr)
    moved = points_to_layout(pts, arr.shape, method.layout)
    np.testing.assert_array_equal(net[moved[:, 0], moved[:, 1], moved[:, 2]], arr[pts[:, 0], pts[:, 1], pts[:, 2]])


def test_sample_pairs_share_anatomy_and_the_target_is_the_clean_patch():
    method = HDSSLMethod(tiny_config(n_pos=40))
    vol = _volume(1)
    s = method.make_sample({"image": vol}, np.random.default_rng(3), 0)
    again = method.make_sample({"image": vol}, np.random.default_rng(3), 0)
    for key in s:
        assert torch.equal(s[key], again[key]), key  # deterministic given the generator
    net_shape = tuple(method.layout.to_network(np.zeros((8, 12, 16))).shape)  # patch (i, j, k) = (16, 12, 8)
    for key in ("patch_a", "patch_b", "clean_a", "clean_b"):
        assert tuple(s[key].shape) == (1, *net_shape)
    mask = s["point_mask"]
    assert mask.shape == (40,) and mask.all()
    pa, pb = s["points_a"][mask].numpy(), s["points_b"][mask].numpy()
    assert len({tuple(p) for p in pa}) == len(pa) and len({tuple(p) for p in pb}) == len(pb)  # distinct
    ca, cb = s["clean_a"][0].numpy(), s["clean_b"][0].numpy()
    va, vb = ca[tuple(pa.T)], cb[tuple(pb.T)]
    unrelated = cb[tuple(np.roll(pb, 7, axis=0).T)]
    assert np.abs(va - vb).mean() < 0.25 * np.abs(va - unrelated).mean()  # same location in both patches
    assert not torch.equal(s["patch_a"], s["clean_a"]) or not torch.equal(s["patch_b"], s["clean_b"])
    plain = HDSSLMethod(tiny_config(n_pos=40, augment=False)).make_sample({"image": vol}, np.random.default_rng(3), 0)
    assert torch.equal(plain["patch_a"], plain["clean_a"]) and torch.equal(plain["patch_b"], plain["clean_b"])


def test_positives_prefer_body_and_missing_points_are_masked():
    vol = _volume(2)
    method = HDSSLMethod(tiny_config(n_pos=30, body_threshold=0.5))
    s = method.make_sample({"image": vol}, np.random.default_rng(0), 0)
    ca = s["clean_a"][0].numpy()
    vals = ca[tuple(s["points_a"].numpy().T)]
    n_body = int((vals >= 0.5).sum())
    assert n_body > 0 and np.all(vals[:n_body] >= 0.5)  # body points first, then the rest
    # A tiny overlap holds fewer distinct voxels than asked for: the rest are masked out of the loss.
    many = HDSSLMethod(tiny_config(n_pos=3000, overlap=(0.3, 0.3)))
    s = many.make_sample({"image": vol}, np.random.default_rng(1), 0)
    mask = s["point_mask"]
    assert 0 < int(mask.sum()) < 3000
    pa = s["points_a"][mask].numpy()
    assert len({tuple(p) for p in pa}) == len(pa)


# ---- losses ---------------------------------------------------------------------------------------------
def _loop_info_nce(za, zb, mask, t) -> float:
    """Eq. (1) with explicit loops, both views as anchors, mean over valid anchors (our reading)."""
    total, count = 0.0, 0
    groups, n, dim = za.shape
    dot = lambda u, v: sum(float(u[c]) * float(v[c]) for c in range(dim))
    for g in range(groups):
        for i in range(n):
            if not mask[g, i]:
                continue
            for own, other in ((za, zb), (zb, za)):
                pos = math.exp(dot(own[g, i], other[g, i]) / t)
                neg = 0.0
                for j in range(n):
                    if j != i and mask[g, j]:
                        neg += math.exp(dot(own[g, i], own[g, j]) / t) + math.exp(dot(own[g, i], other[g, j]) / t)
                total += -math.log(pos / (pos + neg)) / 2
            count += 1
    return total / count


def test_info_nce_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    za = F.normalize(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=-1)
    zb = F.normalize(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    for t in (0.1, 0.5):
        assert float(hdssl_info_nce(za, zb, mask, t)) == pytest.approx(_loop_info_nce(za, zb, mask, t), rel=1e-9)
    # Batch-wide negatives (published code) = one group holding every pair.
    flat = hdssl_info_nce(za.reshape(1, 10, 3), zb.reshape(1, 10, 3), mask.reshape(1, 10), 0.1)
    assert float(flat) == pytest.approx(_loop_info_nce(za.reshape(1, 10, 3), zb.reshape(1, 10, 3),
                                                       mask.reshape(1, 10), 0.1), rel=1e-9)
    # Perfectly matched, well separated embeddings give a lower loss than random ones.
    eye = torch.eye(5, dtype=torch.float64)[None]
    assert float(hdssl_info_nce(eye, eye, torch.ones(1, 5, dtype=torch.bool), 0.1)) < float(
        hdssl_info_nce(za[:1], zb[:1], torch.ones(1, 5, dtype=torch.bool), 0.1))


@pytest.mark.parametrize("negatives", ["pair", "batch"])
def test_training_loss_equals_hand_computation(negatives):
    """forward() = InfoNCE on proj_head(balanced voxel vectors) + 10 * MSE(rest_head(level 0), clean patches),
    recomputed here from the network's own pieces with explicit per-point, per-level, per-voxel loops."""
    torch.manual_seed(1)
    cfg = tiny_config(n_pos=6, negatives=negatives, patch_size=(8, 8, 8), temperature=0.2)
    method = HDSSLMethod(cfg).train()
    batch = _batch(method, n=2, seed=4)
    batch["point_mask"][1, 2] = False  # a masked point is neither anchor nor negative
    with torch.no_grad():
        loss, terms = method(batch, CTX)
        n = 2
        pyramid = method.net(torch.cat([batch["patch_a"], batch["patch_b"]]))
        zs = []
        for view, offset in (("a", 0), ("b", n)):
            rows = []
            for s in range(n):
                for p in range(cfg.n_pos):
                    if not batch["point_mask"][s, p]:
                        continue
                    v = batch[f"points_{view}"][s, p].tolist()
                    parts = []
                    for level, proj in enumerate(method.net.scale_proj):
                        x, y, z = (c // 2**level for c in v)
                        parts.append(proj(pyramid[level][offset + s: offset + s + 1])[0, :, x, y, z])
                    rows.append(torch.cat(parts))
            zs.append(method.net.proj_head(torch.stack(rows)))  # BatchNorm over the valid rows of one view
        mask = batch["point_mask"]
        za = torch.zeros(n, cfg.n_pos, cfg.proj_dim, dtype=torch.float64)
        zb = torch.zeros_like(za)
        za[mask], zb[mask] = zs[0].double(), zs[1].double()
        if negatives == "batch":
            za, zb, mask = za.reshape(1, -1, cfg.proj_dim), zb.reshape(1, -1, cfg.proj_dim), mask.reshape(1, -1)
        contrastive = _loop_info_nce(za, zb, mask, 0.2)
        restored = method.net.rest_head(pyramid[0])
        target = torch.cat([batch["clean_a"], batch["clean_b"]])
        sq = [float(d) ** 2 for d in (restored - target).reshape(-1)]
        restorative = sum(sq) / len(sq)
    assert float(terms["contrastive"]) == pytest.approx(contrastive, rel=1e-5)
    assert float(terms["restorative"]) == pytest.approx(restorative, rel=1e-5)
    assert float(loss) == pytest.approx(contrastive + 10.0 * restorative, rel=1e-5)


# ---- dense embedder -------------------------------------------------------------------------------------
def test_embedder_is_the_normalised_balanced_vector():
    torch.manual_seed(2)
    method = HDSSLMethod(tiny_config(coarse_level=1)).eval()
    emb = method.embedder().eval()
    assert emb.features == "scale_proj" and emb.net is method.net
    x = _volume(3, shape=(8, 12, 16))[None, None]
    with torch.no_grad():
        coarse, fine = emb(x)
        assert fine.shape == (1, 12, 8, 12, 16) and coarse.shape == (1, 8, 4, 6, 8)
        torch.testing.assert_close(fine.norm(dim=1), torch.ones(1, 8, 12, 16))
        torch.testing.assert_close(coarse.norm(dim=1), torch.ones(1, 4, 6, 8))
        # Voxel (k, j, i) of the fine map = normalised concatenation of the projected levels at the voxel's
        # position in the network layout (the one training uses).
        net_in = torch.from_numpy(method.layout.to_network(x.numpy()))
        levels = method.net.project_pyramid(method.net(net_in))
        pts = np.array([[0, 0, 0], [7, 11, 15], [3, 5, 9]])
        moved = torch.from_numpy(points_to_layout(pts, (8, 12, 16), method.layout))
        vec = F.normalize(HDSSLMethod.gather(levels, moved[None]), dim=-1)[0]
        for p, (k, j, i) in enumerate(pts):
            torch.testing.assert_close(fine[0, :, k, j, i], vec[p], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(coarse[0, :, k // 2, j // 2, i // 2], F.normalize(vec[p, 4:], dim=0),
                                       rtol=1e-5, atol=1e-6)
    info = method.model_info()
    assert info["fine_channels"] == 12 and info["coarse_channels"] == 8 and info["coarse_stride"] == 2
    assert info["intensity_preset"]["name"] == "ct_hdssl" and info["spacing"] == [1.0, 1.0, 2.0]


# ---- learning, CLI, export (slow) -----------------------------------------------------------------------
#: Tiny HDSSL for the learning test (settings as ``--set`` overrides). The loss, augmentation chain and its
#: probabilities stay at the paper defaults; a 3-level pyramid on 16^3 patches at 6 mm lets 400 steps fit the
#: CPU budget. Such short runs are noisy: with train seeds 0, 1, 2 this config gave 0.83, 0.80 and 0.53 x the
#: random-init error; a 4-level pyramid on 24^3 patches gave 0.64 / 0.77 / 1.16 (150 steps) and 0.79 / - / 0.74
#: (300 steps). Hence the modest margin asserted below.
TINY_HDSSL_OVERRIDES = [
    # 16 base channels: with 4 the margin over random init was thin and moved with the platform (measured
    # 2026-12-01, trained / random mean error: 4 -> 86.0 / 90.9 mm, 8 -> 51.8 / 75.6, 16 -> 38.1 / 66.2; seed 1
    # at 8: 47.8 / 80.7). Training takes about 50 s instead of 35 s on one thread.
    "method.base_channels=16", "method.num_scales=3", "method.scale_proj_channels=8", "method.coarse_level=1",
    "method.spacing=[6.0]", "method.patch_size=[16,16,16]", "method.n_pos=200",
    "train.batch_size=2", "train.max_steps=400", "train.optimizer=adam", "train.lr=2e-3", "train.warmup_steps=10",
    "train.weight_decay=0", "train.lr_schedule=cosine", "train.num_workers=0", "train.log_every=50",
    "train.ckpt_every=400", "train.progress_bar=false", "train.tensorboard=false", "train.seed=0", "train.threads=1",
]


@pytest.fixture(scope="module")
def trained_hdssl_run(tmp_path_factory, phantom_cohort, held_out_ids) -> Path:
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer

    root = tmp_path_factory.mktemp("hdssl_run")
    manifest = write_training_manifest(phantom_cohort, held_out_ids, root / "train.json")
    run = root / "run"
    assert Trainer(load_run_config("hdssl", None, TINY_HDSSL_OVERRIDES), manifest, run).run() == 0
    return run


@pytest.mark.slow
def test_pretraining_beats_random_init(trained_hdssl_run, phantom_cohort, held_out_ids):
    subjects = [s for s in phantom_cohort.subjects if s.id in held_out_ids]
    check = trained_vs_random(trained_hdssl_run, subjects)
    info = check["info"]
    assert info["method"] == "hdssl" and info["step"] == 400 and info["features"] == "scale_proj"
    # Measured 2026-12-06 (seed 0, CT cropped to the body): 39.6 vs 66.2 mm random init (0.60); identical coordinates
    # 24.7 mm, not beaten at this budget (1.60 x). Asserted: the margins it has.
    assert check["trained"] <= 0.7 * check["random"]
    assert check["trained"] <= 1.8 * check["identity"]


@pytest.mark.slow
def test_export_of_trained_embedder_matches_torch(trained_hdssl_run, tmp_path):
    from anatomical_embedding.inference.export import export_embedder, verify_parity
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    embedder, info = load_embedder_from_run(trained_hdssl_run)
    pkg = export_embedder(embedder, info, tmp_path / "hdssl.aemodel")
    assert verify_parity(pkg, embedder, size_kji=(16, 24, 32)) < 1e-4


@pytest.mark.slow
def test_train_cli_runs_hdssl_end_to_end(phantom_cohort, held_out_ids, tmp_path):
    from anatomical_embedding.cli.app import main
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    manifest = write_training_manifest(phantom_cohort, held_out_ids, tmp_path / "train.json")
    toml = Path(__file__).parents[1] / "Resources" / "configs" / "hdssl.toml"
    sets = [*TINY_HDSSL_OVERRIDES, "train.max_steps=3", "train.log_every=1", "method.n_pos=50",
            "train.threads=1"]
    argv = ["train", "--config", str(toml), "--data", str(manifest), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    embedder, info = load_embedder_from_run(tmp_path / "run")
    assert info["method"] == "hdssl" and info["step"] == 3
    x = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        coarse, fine = embedder(x)
    assert fine.shape == (1, 24, 16, 24, 32) and coarse.shape == (1, 16, 8, 12, 16)  # 3 x 8; levels 1-2, stride 2
    assert torch.isfinite(fine).all() and torch.isfinite(coarse).all()
