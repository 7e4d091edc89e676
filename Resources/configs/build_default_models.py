"""Build the shipped default models from their recipes (needs the development workspace's ``../shared/data``).

    python Resources/configs/build_default_models.py [--modality ct mr] [--runs runs] [--checkpoint last]
    python Resources/configs/build_default_models.py --card-benchmark benchmarks/results/real.json

For each modality: ``train`` with ``default_<m>.toml`` on ``default_<m>_data.json`` (resumed when the run
folder exists, so a long CPU run can continue over several sessions), ``export`` to
``AnatomicalEmbedding/anatomical_embedding/models/default_<m>.aemodel``, and the model card completed with the
modality, every training source with its licence, the recipe, the steps and the training wall time.
``--card-benchmark`` writes the real-data benchmark's figures for the model (``benchmarks/bench_real.py``) into
its card (``benchmark``), without training; the network and its hash are unchanged.
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


#: The rows of the real-data benchmark a card quotes, per pair group (``{m}``: the model's label).
CARD_METHODS = ("identical coordinates", "registration affine", "registration affine+bspline", "{m} raw",
                "{m} coarse prior", "{m} robust prior")


def benchmark_figures(real: dict, modality: str) -> dict:
    """The card's ``benchmark`` entry: the model's rows of ``real.json`` next to the baselines, per pair group."""
    label = f"default_{modality}"
    rows = {(r["group"], r["method"]): r for r in real["summary"]}
    groups = {}
    for group in (f"intra {MODALITY[modality]}", f"slab {MODALITY[modality]}", f"cross {MODALITY[modality]}"):
        figures = {}
        for method in (m.format(m=label) for m in CARD_METHODS):
            r = rows.get((group, method))
            if r is not None:
                figures[method.replace(label, "this model")] = {
                    "pairs": r["pairs"], "points": r["points"], "mean_mm": round(r["mean_mm"], 2),
                    "median_mm": round(r["median_mm"], 2), "p90_mm": round(r["p90_mm"], 2),
                    "seconds_per_pair": round(r["seconds_per_pair"], 2)}
        if any(k.startswith("this model") for k in figures):
            groups[group] = figures
    if not groups:
        raise SystemExit(f"the benchmark has no rows for {label}; run benchmarks/bench_real.py --model it")
    machine = real.get("machine", {})
    return {"source": "benchmarks/results/real.md", "date": real.get("meta", {}).get("date"),
            "command": real.get("command"),
            "machine": f"{machine.get('cpu_model')} ({machine.get('cpu_usable')} CPUs, {machine.get('threads')} "
                       f"threads, load {machine.get('load_average_1min')})", "groups": groups}


def write_card_benchmark(modality: str, real_json: Path) -> Path:
    from anatomical_embedding.inference.backends import read_package
    from anatomical_embedding.inference.export import write_package

    out = MODELS / f"default_{modality}.aemodel"
    card, members = read_package(out)
    card["benchmark"] = benchmark_figures(json.loads(real_json.read_text(encoding="utf-8")), modality)
    write_package(out, card, members, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", nargs="+", choices=sorted(MODALITY), default=sorted(MODALITY))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="run folders (resumed when present)")
    ap.add_argument("--checkpoint", default="last", help="checkpoint to export (last, best or a step)")
    ap.add_argument("--card-benchmark", type=Path, metavar="REAL_JSON",
                    help="only write this real-data benchmark result's figures into the shipped models' cards")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.card_benchmark:
        for m in args.modality:
            print(f"wrote the benchmark figures into {write_card_benchmark(m, args.card_benchmark)}")
        return 0
    for m in args.modality:
        print(f"wrote {build(m, args.runs, args.checkpoint)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
