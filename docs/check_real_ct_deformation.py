"""By-hand check of matching on a real CT under a known synthetic deformation (not a test: it needs a real scan).

    python docs/check_real_ct_deformation.py [--ct ../shared/data/ct-abdomen-pelvis-example/example_ct.nii.gz]
                                             [--out check-real-ct] [--steps 300]

The target is the CT resampled through a known transform T (rotation 6 and 4 degrees, scale 1.04, a 16 mm shift
and a smooth B-spline displacement of a few mm): ``target(q) = source(T(q))``. A short self-supervised AEFM run
sees the source CT only. Body voxels of the target (a 9-voxel grid, HU > -300) are matched into the source,
where the truth is ``T(q)``; the script prints raw and robust-prior errors (median, mean, p90 in mm) against
leaving each point at the same world position, and writes ``result.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))  # the tests' AEFM recipe (fixtures_data.TINY_AEFM_OVERRIDES)
DEFAULT_CT = ROOT.parent / "shared" / "data" / "ct-abdomen-pelvis-example" / "example_ct.nii.gz"


def known_transform(image, seed: int = 0):
    """Affine (about the image centre) composed with a B-spline displacement; SimpleITK applies the last added first."""
    import SimpleITK as sitk

    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) / 2.0).tolist()))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    rz, rx = np.deg2rad(6.0), np.deg2rad(4.0)
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    affine.SetMatrix((1.04 * rot_z @ rot_x).ravel().tolist())
    affine.SetTranslation([9.0, -6.0, 12.0])
    bspline = sitk.BSplineTransformInitializer(image, [4, 4, 4], order=3)
    bspline.SetParameters(np.random.default_rng(seed).normal(0.0, 2.5, len(bspline.GetParameters())).tolist())
    return sitk.CompositeTransform([affine, bspline])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=Path, default=DEFAULT_CT)
    ap.add_argument("--out", type=Path, default=Path("check-real-ct"))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    if not args.ct.is_file():
        print(f"error: no CT at {args.ct}; pass --ct PATH to a CT volume", file=sys.stderr)
        return 2
    import SimpleITK as sitk
    from anatomical_embedding.evaluation.known_pairs import grid_points_above, map_points
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import embed_volume
    from anatomical_embedding.io import read_image
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer
    from fixtures_data import TINY_AEFM_OVERRIDES

    args.out.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(args.ct))
    transform = known_transform(image)
    sitk.WriteImage(sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0), str(args.out / "target.nii.gz"))
    manifest = args.out / "train.json"
    manifest.write_text(json.dumps({"cases": [{"id": "source", "image": str(args.ct.resolve())}]}), encoding="utf-8")
    # The tests' small AEFM recipe, at 6 mm (a 32^3 patch covers 192 mm of the abdomen).
    overrides = [*TINY_AEFM_OVERRIDES, "method.spacing=[6.0,6.0,6.0]", f"train.max_steps={args.steps}",
                 f"train.ckpt_every={args.steps}", "train.progress_bar=true"]
    run = args.out / "run"
    t0 = time.perf_counter()
    if not (run / "config.toml").exists() and Trainer(load_run_config("aefm", None, overrides), manifest, run).run():
        return 1
    train_s = time.perf_counter() - t0
    model = open_model(run)
    source, target = read_image(args.ct), read_image(args.out / "target.nii.gz")
    src_emb, tgt_emb = embed_volume(model, source), embed_volume(model, target)
    queries = grid_points_above(target, -300.0, margin=10, step=9)  # inside the body
    truth = map_points(transform, queries)
    keep = src_emb.inside(src_emb.world_to_index(truth), margin=3.0)  # the truth must lie inside the source
    queries, truth = queries[keep], truth[keep]
    matches = Matcher(tgt_emb, src_emb).match(queries)

    def stats(err: np.ndarray) -> list[float]:
        return [round(float(np.median(err)), 1), round(float(np.mean(err)), 1), round(float(np.percentile(err, 90)), 1)]

    result = {
        "ct": str(args.ct), "points": len(queries), "train_s": round(train_s, 1),
        "median_mean_p90_mm": {
            "raw": stats(np.linalg.norm([m.raw.point_lps for m in matches] - truth, axis=1)),
            "robust_prior": stats(np.linalg.norm([m.final.point_lps for m in matches] - truth, axis=1)),
            "identical_coordinate": stats(np.linalg.norm(queries - truth, axis=1)),
        },
        "low_confidence_fraction": round(float(np.mean([m.final.low_confidence for m in matches])), 3),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
