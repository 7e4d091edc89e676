"""Render the README picture of the viewer module from the headless MRML scene (slicer-core, no Slicer GUI).

    python docs/render_viewer_figure.py MODEL.aemodel [--out docs/images/viewer_correspond.png]

Runs what the viewer does on the "Phantom pair" sample: embeds both phantoms, matches one clicked landmark
(with its similarity heatmap on the target's grid) and transfers the whole landmark list, then draws the
nodes' contents with matplotlib: source slice with the click, target slice with the heatmap foreground,
the match and the ground truth, and every transferred landmark against its ground truth.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pytest
    import slicer
    from anatomical_embedding import mrml
    from anatomical_embedding.io import convert_points
    from fixtures_mrml import bootstrap_headless_slicer, teardown_headless_slicer
    from test_viewer_module import load_viewer_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model package (.aemodel)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "viewer_correspond.png"))
    parser.add_argument("--landmark", default="kidney_left_centroid")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="ae-figure-")
    app = bootstrap_headless_slicer(tmp)
    with pytest.MonkeyPatch.context() as mp:
        module = load_viewer_module(mp, tmp)
        logic = module.AnatomicalEmbeddingLogic(cacheDir=str(Path(tmp) / "cache"))
        logic.loadModel(args.model, "ONNX Runtime", "cpu")
        source, target = logic.loadPhantomPairSample(seed=args.seed, outputDir=str(Path(tmp) / "pair"),
                                                     spacing=4.0, size=64)
        job = logic.prepareCorrespondenceAsync(source["volume"], [target["volume"]])
        job.wait()
        logic.finishJob(job)
        names, src_lps = mrml.markups_node_to_points(source["landmarks"])
        _, truth_lps = mrml.markups_node_to_points(target["landmarks"])
        n = names.index(args.landmark)
        clicks = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        logic.startClickToCorrespond(clicks, source["volume"], target["volume"])
        import vtk

        clicks.AddControlPoint(vtk.vtkVector3d(*convert_points(src_lps[n], "LPS", "RAS")), names[n])
        result = logic._click["results"][-1]
        heat = logic.updateHeatmap(source["volume"], target["volume"], result["query_ras"])
        transferred = logic.transferAll(source["landmarks"], source["volume"], [target["volume"]])[0]
        _, moved = mrml.markups_node_to_points(transferred)

        src_vol, dst_vol = mrml.node_to_volume(source["volume"]), mrml.node_to_volume(target["volume"])
        heat_arr = slicer.util.arrayFromVolume(heat)

        def ijk(volume, lps):
            return np.atleast_2d(volume.world_to_index(np.atleast_2d(lps)))

        fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), dpi=72)
        q = ijk(src_vol, src_lps[n])[0]
        k = round(q[2])
        axes[0].imshow(src_vol.array[k], cmap="gray", vmin=-400, vmax=400, origin="lower")
        axes[0].plot(q[0], q[1], "r+", ms=14, mew=2)
        axes[0].set_title(f"source: click on {names[n]}", fontsize=9)
        m = ijk(dst_vol, convert_points(result["ras"], "RAS", "LPS"))[0]
        t = ijk(dst_vol, truth_lps[n])[0]
        k = round(m[2])
        axes[1].imshow(dst_vol.array[k], cmap="gray", vmin=-400, vmax=400, origin="lower")
        overlay = np.ma.masked_less(heat_arr[k], 0.0)
        axes[1].imshow(overlay, cmap="jet", vmin=0, vmax=1, alpha=0.45, origin="lower")
        colour = "orange" if result["low_confidence"] else "lime"
        axes[1].plot(m[0], m[1], "+", color=colour, ms=14, mew=2, label="match")
        axes[1].plot(t[0], t[1], "wx", ms=9, mew=2, label="ground truth")
        err = float(np.linalg.norm(convert_points(result["ras"], "RAS", "LPS") - truth_lps[n]))
        axes[1].set_title(f"target + heatmap: sim {result['similarity']:.2f}, conf {result['confidence']:.2f}, "
                          f"error {err:.0f} mm", fontsize=9)
        axes[1].legend(loc="lower right", fontsize=7)
        # Transfer all: coronal projection of matches vs ground truth (j is roughly anterior-posterior).
        mid = int(dst_vol.array.shape[1] // 2)
        axes[2].imshow(dst_vol.array[:, mid, :], cmap="gray", vmin=-400, vmax=400, origin="lower", aspect="auto")
        a, b = ijk(dst_vol, moved), ijk(dst_vol, truth_lps)
        for p_, q_ in zip(a, b):
            axes[2].plot([p_[0], q_[0]], [p_[2], q_[2]], "y-", lw=1)
        axes[2].plot(a[:, 0], a[:, 2], "o", color="lime", ms=4, label="transferred")
        axes[2].plot(b[:, 0], b[:, 2], "wx", ms=5, label="ground truth")
        errors = np.linalg.norm(moved - truth_lps, axis=1)
        axes[2].set_title(f"transfer all: {len(names)} landmarks, median error {np.median(errors):.0f} mm", fontsize=9)
        axes[2].legend(loc="lower right", fontsize=7)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        print(f"wrote {out} ({out.stat().st_size // 1024} KB); click error {err:.1f} mm, "
              f"transfer median {np.median(errors):.1f} mm")
    teardown_headless_slicer(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
