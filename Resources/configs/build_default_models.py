"""Build the shipped default models from their recipes (needs the development workspace's ``../shared/data``).

    python Resources/configs/build_default_models.py [--modality ct mr] [--runs runs] [--checkpoint last]

For each modality: ``train`` with ``default_<m>.toml`` on ``default_<m>_data.json`` (resumed when the run
folder exists, so a long CPU run can continue over several sessions), ``export`` to
``AnatomicalEmbedding/anatomical_embedding/models/default_<m>.aemodel``, and the model card completed with the
modality, every training source with its licence, the recipe, the steps and the training wall time.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODELS = ROOT / "AnatomicalEmbedding" / "anatomical_embedding" / "models"
MODALITY = {"ct": "CT", "mr": "MR"}


def _training_seconds(run: Path) -> float:
    """Wall time of the run's training steps, summed over its (resumed) sessions, from progress.jsonl."""
    total, start = 0.0, None
    last = None
    for line in (run / "progress.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "start":
            if start is not None and last is not None:
                total += last - start
            start, last = event["time"], event["time"]
        elif "time" in event:
            last = event["time"]
    if start is not None and last is not None:
        total += last - start
    return round(total, 1)


def build(modality: str, runs: Path, checkpoint: str) -> Path:
    from anatomical_embedding.inference.backends import read_package
    from anatomical_embedding.inference.export import export_run, write_package
    from anatomical_embedding.training.config import config_file_for_run, load_run_config
    from anatomical_embedding.training.engine import Trainer

    config, data = HERE / f"default_{modality}.toml", HERE / f"default_{modality}_data.json"
    run = runs / f"default_{modality}"
    resume = (run / "config.toml").is_file()
    cfg = load_run_config(None, config_file_for_run(run, None if resume else config, resume))
    if Trainer(cfg, data, run, resume=resume).run() != 0:
        raise SystemExit(f"training {run} failed")
    out = MODELS / f"default_{modality}.aemodel"
    # No coarse-only graph: it would double the package (the 20 MB budget of a shipped model) for a small net
    # whose full forward pass is cheap at 3-4 mm.
    export_run(run, out, checkpoint=checkpoint, overwrite=True, coarse_graph=False)
    card, members = read_package(out)
    listed = json.loads(data.read_text(encoding="utf-8"))
    card.update({
        "modality": MODALITY[modality],
        "name": f"Default {MODALITY[modality]} model",
        "recipe": {"config": f"Resources/configs/{config.name}", "data": f"Resources/configs/{data.name}",
                   "command": f"python Resources/configs/{Path(__file__).name} --modality {modality}"},
        "training_wall_s": _training_seconds(run),
    })
    card["training_data"] = {**card.get("training_data", {}),
                             "sources": [{"id": c["id"], "license": c["license"]} for c in listed["cases"]]}
    write_package(out, card, members, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", nargs="+", choices=sorted(MODALITY), default=sorted(MODALITY))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="run folders (resumed when present)")
    ap.add_argument("--checkpoint", default="last", help="checkpoint to export (last, best or a step)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for m in args.modality:
        print(f"wrote {build(m, args.runs, args.checkpoint)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
