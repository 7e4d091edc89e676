"""Render the README picture of the viewer module from the real MRML slice views (slicer-core, offscreen).

    python docs/render_viewer_figure.py MODEL.aemodel [--out docs/images/viewer_correspond.png]

Runs what the viewer does on the "Phantom pair" sample: embeds both phantoms, sets up the correspondence layout
(source row on top, target row below), places one landmark in a source view, matches it, shows the heatmap on the
target views and transfers the whole list into the results table. Each of the six views is then resliced and
blended by Slicer's own ``vtkMRMLSliceLogic`` from the views' slice and slice composite nodes (background volume,
heatmap foreground with its colour table, window/level and opacity), exactly the image pipeline of Slicer's slice
views. Markups are drawn at their projection into each view (slicer-core has no displayable managers), and the
results table node's rows are printed below the views as the module's table shows them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "AnatomicalEmbedding")]
VIEW = 260  # pixels per slice view


def render_view(app, sliceNode, centre_ras):
    """RGBA image of one slice view, as Slicer's slice logic blends it (layers from the composite node)."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app.app_logic)
    logic.SetMRMLScene(app.scene)
    logic.SetSliceNode(sliceNode)
    sliceNode.SetDimensions(VIEW, VIEW, 1)
    logic.FitSliceToAll()
    sliceNode.JumpSliceByCentering(*centre_ras)
    logic.UpdatePipeline() if hasattr(logic, "UpdatePipeline") else None
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    w, h, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1]
    return rgba[..., :3].copy(), logic


def project(sliceNode, ras):
    """Pixel (column, row) of a RAS point in the view and its distance from the slice plane (mm)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), m)
    x, y, z, _ = m.MultiplyPoint([*ras, 1.0])
    thickness = max(sliceNode.GetFieldOfView()[2], 1e-6)
    return x, VIEW - 1 - y, abs(z) * thickness


def main(argv=None) -> int:
    import pytest
    import slicer
    import vtk
    from PIL import Image, ImageDraw

    from anatomical_embedding import mrml
    from anatomical_embedding.io import convert_points
    from AnatomicalEmbeddingLib import views
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
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(app.scene)  # as Slicer does at start-up
    with pytest.MonkeyPatch.context() as mp:
        module = load_viewer_module(mp, tmp)
        logic = module.AnatomicalEmbeddingLogic(cacheDir=str(Path(tmp) / "cache"))
        logic.loadModel(args.model, "ONNX Runtime", "cpu")
        source, target = logic.loadPhantomPairSample(seed=args.seed, outputDir=str(Path(tmp) / "pair"),
                                                     spacing=4.0, size=64)
        for node in (source["volume"], target["volume"]):
            node.GetDisplayNode().SetAutoWindowLevel(0)
            node.GetDisplayNode().SetWindowLevel(800, 0)
        job = logic.prepareCorrespondenceAsync(source["volume"], [target["volume"]], bothWays=True)
        job.wait()
        logic.finishJob(job)
        names, src_lps = mrml.markups_node_to_points(source["landmarks"])
        _, truth_lps = mrml.markups_node_to_points(target["landmarks"])
        n = names.index(args.landmark)
        clicks = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Source points")
        heat = [None]

        def matched(result):
            heat[0] = logic.updateHeatmap(source["volume"], target["volume"], result["query_ras"], heat[0], 0.45)

        matches = logic.startClickToCorrespond(clicks, source["volume"], target["volume"], onMatched=matched)
        clicked = convert_points(src_lps[n], "LPS", "RAS")
        clicks.AddControlPoint(vtk.vtkVector3d(*clicked), names[n])
        result = logic._click["results"][-1]
        logic.stopClickToCorrespond()
        transferred = logic.transferAll(source["landmarks"], source["volume"], [target["volume"]])[0]
        table = logic.updateResultsTable(None, [matches, transferred])
        rows = logic.resultsTableRows(table)

        panels = []
        for role, centre in (("source", clicked), ("target", result["ras"])):
            row = []
            for composite in views.correspondenceViews(app.scene, role):
                sliceNode = views._sliceByLayoutName(app.scene, composite.GetLayoutName())
                rgb, _ = render_view(app, sliceNode, centre)
                img = Image.fromarray(rgb)
                draw = ImageDraw.Draw(img)
                points = [(clicked, (255, 60, 60), "+")] if role == "source" else [
                    (convert_points(truth_lps[n], "LPS", "RAS"), (255, 255, 255), "x"),
                    (result["ras"], (255, 150, 0) if result["low_confidence"] else (60, 230, 80), "+")]
                for ras, colour, mark in points:
                    x, y, dz = project(sliceNode, ras)
                    if dz > 6.0:
                        continue
                    if mark == "+":
                        draw.line([(x - 7, y), (x + 7, y)], fill=colour, width=2)
                        draw.line([(x, y - 7), (x, y + 7)], fill=colour, width=2)
                    else:
                        draw.line([(x - 5, y - 5), (x + 5, y + 5)], fill=colour, width=2)
                        draw.line([(x - 5, y + 5), (x + 5, y - 5)], fill=colour, width=2)
                bg = app.scene.GetNodeByID(composite.GetBackgroundVolumeID())
                fg = composite.GetForegroundVolumeID()
                label = f"{composite.GetLayoutName()}: {bg.GetName()}" + (" + similarity" if fg else "")
                draw.rectangle([0, 0, VIEW, 14], fill=(0, 0, 0))
                draw.text((3, 1), label, fill=(250, 220, 120) if role == "target" else (140, 190, 255))
                row.append(img)
            panels.append(row)

        lines = [f"{'label':<26}{'target':<30}{'similarity':>11}{'confidence':>11}  flag"]
        for r in rows[:1] + rows[1:9]:
            lines.append(f"{r['label'][:25]:<26}{r['target'][:29]:<30}{r['similarity']:>11.2f}"
                         f"{r['confidence']:>11.2f}  {r['flag']}")
        lines.append(f"... {len(rows)} rows in 'Correspondence results' (the module's results table)")
        error = float(np.linalg.norm(convert_points(result["ras"], "RAS", "LPS") - truth_lps[n]))
        header = [f"Click-to-correspond: {names[n]} clicked in the source row (red +), matched in the target row",
                  f"(green +, orange when low confidence; ground truth white x): similarity {result['similarity']:.2f}, "
                  f"confidence {result['confidence']:.2f}, error {error:.0f} mm"]
        width, table_h = 3 * VIEW + 4, 16 * len(lines) + 46
        canvas = Image.new("RGB", (width, 2 * VIEW + 4 + table_h), (24, 24, 28))
        for r, row in enumerate(panels):
            for c, img in enumerate(row):
                canvas.paste(img, (c * (VIEW + 2), r * (VIEW + 2)))
        draw = ImageDraw.Draw(canvas)
        y0 = 2 * VIEW + 8
        for i, line in enumerate(header):
            draw.text((6, y0 + 14 * i), line, fill=(230, 230, 230))
        for i, line in enumerate(lines):
            draw.text((6, y0 + 34 + 16 * i), line, fill=(200, 200, 200))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out)
        print(f"wrote {out} ({out.stat().st_size // 1024} KB); click error {error:.1f} mm")
    teardown_headless_slicer(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
