"""GUI-thread time of one click's display update on a large target (512 x 512 x 300 CT grid).

What a click costs on Slicer's GUI thread after the match itself: the similarity heatmap and writing it into the
scene (real MRML nodes on slicer-core), before and after issue 19.

* before: the heatmap resampled to the full target grid, and a full copy of the target read from the node
  (``Matcher.heatmap(reference=node_to_volume(target))``);
* after: the heatmap on the embedding's coarse grid (``AnatomicalEmbeddingLib.views.coarseSimilarity``), which
  Slicer reslices for display.

The embeddings have the full-size AEFM's shape (64 coarse channels at stride 8 on a 1 mm grid) with random values:
the cost does not depend on the values, and embedding a 512 x 512 x 300 CT with the full network on this CPU takes
far longer than the benchmark budget. The match itself (coarse search over the whole target and fine refinement)
is timed too: since issue 19 it runs in the worker thread (``matchInBackground``), so the GUI thread's share of a
click is reading the point (~1 ms), and, when the match arrives, writing it and this display update.

``--network`` embeds a CT-like 512 x 512 x 300 volume and its shifted copy with the untrained full-size AEFM
network instead (torch, 96^3 windows; about 2 minutes per volume on 2 cores): the match row is then a real one,
cold fine tiles computed once before the timed repeats. Rows of the other kind already in the results are kept.

Usage: python benchmarks/bench_gui_click.py [--repeats 5] [--skip-before] [--network]
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "AnatomicalEmbedding"), str(ROOT / "Testing"), str(Path(__file__).parent)]

SHAPE_IJK = (512, 512, 300)
SPACING = (0.7, 0.7, 1.0)
COARSE_CHANNELS, STRIDE, MODEL_SPACING = 64, 8, 1.0


def embedding_like_full_aefm(volume, seed):
    from anatomical_embedding.inference.embedding import EmbedConfig, VolumeEmbedding
    from anatomical_embedding.io import Volume

    shape = np.ceil(np.asarray(volume.shape_ijk) * volume.spacing / MODEL_SPACING).astype(int)
    shape = -(-shape // 16) * 16
    prepared = Volume(np.zeros(shape[::-1], np.float32), np.full(3, MODEL_SPACING), volume.origin, volume.direction)
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((COARSE_CHANNELS,) + tuple(shape[::-1] // STRIDE)).astype(np.float32)
    def embed_patch(x, want_fine=True):  # stand-in network: the match's numpy work is what is timed
        k, j, i = x.shape[2:]
        return None, np.random.default_rng(int(k * j * i) % 1000).standard_normal((1, 64, k, j, i)).astype(np.float32)

    model = types.SimpleNamespace(coarse_stride=STRIDE, fine_channels=64, size_multiple=16, model_hash="bench",
                                  spacing=np.full(3, MODEL_SPACING), embed_patch=embed_patch)
    return VolumeEmbedding(model, prepared, np.zeros(3, int), shape, coarse, f"bench{seed}", EmbedConfig(), None)


def embedded_with_full_aefm(source, target):
    """Both volumes embedded by the untrained full-size AEFM (widths 64-512, 64-d) through torch."""
    import torch

    from anatomical_embedding.inference.backends import TorchModel
    from anatomical_embedding.inference.embedding import EmbedConfig, embed_volume
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.manual_seed(0)
    card = {"spacing": [MODEL_SPACING] * 3, "intensity_preset": "ct_aefm", "method": "aefm", "modality": "CT",
            "patch_size": [96, 96, 96]}
    model = TorchModel(AEFMUNet((64, 128, 256, 512), COARSE_CHANNELS), card)
    return [embed_volume(model, v, config=EmbedConfig()) for v in (source, target)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-before", action="store_true", help="do not time the old full-grid resample")
    ap.add_argument("--network", action="store_true",
                    help="embed a CT-like volume with the untrained full-size AEFM instead of random embeddings")
    args = ap.parse_args(argv)

    import slicer
    from _common import machine_description, machine_line, md_table, write_results
    from fixtures_mrml import bootstrap_headless_slicer

    from anatomical_embedding import mrml
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.io import Volume, convert_points
    from AnatomicalEmbeddingLib import views

    app = bootstrap_headless_slicer(str(Path("/tmp") / "bench-gui-click-cache"))
    scene = app.scene
    if args.network:
        from bench_embedding import ct_like

        ct = Volume(ct_like(SHAPE_IJK[::-1]), np.array(SPACING), np.zeros(3), np.eye(3))
        moved = Volume(ct.array, ct.spacing, ct.origin + np.array([7.0, -5.0, 3.0]), ct.direction)
        t0 = time.perf_counter()
        src_emb, tgt_emb = embedded_with_full_aefm(ct, moved)
        print(f"embedded both volumes with the full-size AEFM in {time.perf_counter() - t0:.0f} s")
    else:
        ct = moved = Volume(np.full(SHAPE_IJK[::-1], -1000, np.int16).astype(np.float32), np.array(SPACING),
                            np.zeros(3), np.eye(3))
        src_emb, tgt_emb = embedding_like_full_aefm(ct, 0), embedding_like_full_aefm(ct, 1)
    target = mrml.volume_to_node(moved, scene, "target CT")
    views.setupCorrespondenceLayout(mrml.volume_to_node(ct, scene, "source CT"), target)
    matcher = Matcher(src_emb, tgt_emb)
    centre = convert_points(ct.index_to_world((np.asarray(SHAPE_IJK) - 1) / 2.0), "LPS", "RAS")

    after, heat = [], None
    views.coarseSimilarity(matcher, centre)  # first call caches the target's norms (done once per volume)
    for r in range(args.repeats):
        t0 = time.perf_counter()
        volume = views.coarseSimilarity(matcher, centre + r)
        heat = views.showHeatmapVolume(volume, target, heat, 0.5)
        after.append(time.perf_counter() - t0)
    coarse_voxels = int(np.prod(slicer.util.arrayFromVolume(heat).shape))
    # The match itself (coarse search over the whole target, fine refinement), fine tiles already in memory as
    # after the background precompute: first call computes the needed tiles (not timed), then timed repeats.
    query = convert_points(centre, "RAS", "LPS")
    matcher.match(query, "LPS", use_prior=False, with_raw=False)
    match = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        matcher.match(query, "LPS", use_prior=False, with_raw=False)
        match.append(time.perf_counter() - t0)
    before = []
    if not args.skip_before:
        for r in range(min(2, args.repeats)):
            t0 = time.perf_counter()
            old = matcher.heatmap(convert_points(centre + r, "RAS", "LPS"), reference=mrml.node_to_volume(target))
            mrml.set_node_from_volume(heat, old)
            before.append(time.perf_counter() - t0)
    rows = [{"case": "match (coarse search + fine refinement, tiles precomputed, no prior): worker thread since issue 19, was GUI thread",
             "median_ms": round(1000 * float(np.median(match)), 1), "max_ms": round(1000 * float(np.max(match)), 1),
             "heatmap_voxels": 0},
            {"case": "click display update, after (coarse heatmap, Slicer reslices)",
             "median_ms": round(1000 * float(np.median(after)), 1), "max_ms": round(1000 * float(np.max(after)), 1),
             "heatmap_voxels": coarse_voxels}]
    if before:
        rows.append({"case": "click display update, before (full-grid resample + target copy)",
                     "median_ms": round(1000 * float(np.median(before)), 1),
                     "max_ms": round(1000 * float(np.max(before)), 1), "heatmap_voxels": int(np.prod(SHAPE_IJK))})
    machine = machine_description()
    kind = "full-size AEFM network (untrained), torch" if args.network else "random, full-size AEFM shape"
    for row in rows:
        row.update(embeddings=kind, date=machine["date"], load_average_1min=machine["load_average_1min"],
                   cpu=machine["cpu_model"])
        print(row)
    results = ROOT / "benchmarks" / "results"
    previous = results / "gui_click.json"
    if previous.is_file():  # keep the rows of the other embedding kind (each kind is rerun on its own)
        import json

        old = json.loads(previous.read_text())
        # Rows written before the CPU column came from the machine of that file.
        kept = [{"cpu": old.get("machine", {}).get("cpu_model", ""), **r} for r in old.get("rows", [])
                if r.get("embeddings", kind) != kind]
        rows = kept + rows
    md = ["# GUI-thread time per click (display update), 512 x 512 x 300 target", "",
          machine_line(machine) + " (this run's machine; each row names the CPU it was measured on)", "",
          *md_table(["embeddings", "case", "median ms", "max ms", "heatmap voxels", "CPU", "date", "load"],
                    [[r.get("embeddings", ""), r["case"], r["median_ms"], r["max_ms"], r["heatmap_voxels"],
                      r.get("cpu", ""), r.get("date", ""), r.get("load_average_1min", "")] for r in rows])]
    write_results(results, "gui_click",
                  {"machine": machine, "target_grid_ijk": list(SHAPE_IJK), "coarse_channels": COARSE_CHANNELS,
                   "stride": STRIDE, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
