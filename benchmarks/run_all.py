"""Run every benchmark and write one summary (benchmarks/results/summary.json and summary.md).

    python benchmarks/run_all.py [--quick] [--only training embedding fewshot real] [--device auto|cpu|cuda]
                                 [--threads 2] [--fewshot-model RUN_DIR_OR_PACKAGE] [--full-embedding]
                                 [--real-model RUN_DIR_OR_PACKAGE ...] [--real-data DIR] [--out benchmarks/results]

Benchmarks (each in its own process, so that its peak memory is its own; see each script's docstring):

* ``training``: AEFM training throughput (``bench_training.py``): s per step, samples/s, MFU on a GPU;
* ``embedding``: embedding time of a volume, per-click latency (cold and warm, median and p90), peak
  memory and embedding cache size per volume, torch and ONNX Runtime (``bench_embedding.py``). The
  published-size network embeds 128^3 and the big volumes are extrapolated (``--quick`` of the script)
  unless ``--device cuda`` (GPU backends only) or ``--full-embedding`` is given (256^3 and 300x512x512
  measured: hours for the CPU backends on 2 cores);
* ``fewshot``: few-shot head training and apply time and Dice against labelled cases (``bench_fewshot.py``;
  it trains the tiny test AEFM first unless ``--fewshot-model`` names a model);
* ``real`` (only when named in ``--only``: it needs the real sample volumes of ``../shared/data``, which a fresh
  clone does not have): landmark transfer on real CT and MR volumes, models against identical coordinates and
  SimpleITK registration (``bench_real.py``; with ``--real-model`` for each model given, otherwise with a small
  AEFM trained for 180 s on the benchmark's volumes).

``--quick`` runs every benchmark at a tiny size (the scripts' ``--smoke``; about a minute on two busy
cores) into a new temporary folder unless ``--out`` is given: it checks that everything runs and is what the
tests use; its numbers are not measurements.
Each benchmark writes ``NAME.json`` and ``NAME.md`` under ``--out``; this script adds ``summary.json`` and
``summary.md`` (the machine description, the headline numbers of every benchmark, peak memory and wall
time of each benchmark process). ``--only`` reruns some benchmarks; the others' earlier results in
``--out`` are summarised as they are, marked with their date.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import MACHINE_KEYS, machine_description, machine_line, machine_table, md_table, write_results

log = logging.getLogger("run_all")
HERE = Path(__file__).resolve().parent
BENCHMARKS = ("training", "embedding", "fewshot")
#: Run only when named in --only (they need data outside the repository); summarised when their results exist.
OPTIONAL = ("real",)
#: The five things the summary must cover (issue: throughput, embedding time, click latency, memory, few-shot).
CATEGORIES = ("training throughput", "embedding time", "click latency", "memory", "few-shot head")


def bench_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of one benchmark for this run's options."""
    cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(out), "--threads", str(args.threads),
           "--device", args.device]
    if args.quick:
        return cmd + ["--smoke"] + (["--data", args.real_data] if name == "real" and args.real_data else [])
    if name == "embedding" and not args.full_embedding and args.device != "cuda":
        cmd.append("--quick")  # the CPU backends at full size take hours on a few cores
    if name == "fewshot" and args.fewshot_model:
        cmd += ["--model", args.fewshot_model]
    if name == "real":
        if args.real_data:
            cmd += ["--data", args.real_data]
        for model in args.real_model or []:
            cmd += ["--model", model]
        if not args.real_model:
            cmd += ["--train-quick-aefm", "180"]
    return cmd


def run_one(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a benchmark process; return its exit code, wall time, peak RSS and the tail of its output."""
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, text=True)
        # wait4 gives this child's resource usage: ru_maxrss is the largest of it and the processes it waited
        # for (bench_embedding runs each configuration in a process of its own).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        logf.seek(0)
        tail = logf.read()[-4000:]
    return {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "log_tail": tail}


# ---- headline numbers of each benchmark ---------------------------------------------------------------
def _metric(category: str, config: str, metric: str, value: Any, unit: str) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"category": category, "config": config, "metric": metric, "value": float(value), "unit": unit}


def training_metrics(res: dict) -> list[dict]:
    out = []
    for r in res.get("results", []):
        cfg = f"{r['name']}{' compiled' if r.get('compile') else ''}, {r.get('gpu') or r['device']}, batch {r['batch']}"
        out += [_metric("training throughput", cfg, "time per step", r["s_per_step"], "s"),
                _metric("training throughput", cfg, "samples per second", r["samples_per_s"], "1/s"),
                _metric("training throughput", cfg, "MFU", r.get("mfu") and 100 * r["mfu"], "%"),
                _metric("memory", cfg, "peak RSS (training)", r.get("peak_rss_mb"), "MB"),
                _metric("memory", cfg, "peak GPU memory (training)", r.get("gpu_mem_mb"), "MB")]
    return out


def embedding_metrics(res: dict) -> list[dict]:
    out = []
    for r in res.get("results", []):
        if "error" in r:
            continue
        cfg = f"{r['backend']}, {r.get('device', 'cpu')}, {'x'.join(map(str, r['shape_kji']))}"
        out += [_metric("embedding time", cfg, "embed a volume", r["embed_s"], "s"),
                _metric("embedding time", cfg, "embed again (cached)", r["embed_cached_s"], "s"),
                _metric("click latency", cfg, "cold click, median", r.get("click_cold_ms_median"), "ms"),
                _metric("click latency", cfg, "cold click, p90", r.get("click_cold_ms_p90"), "ms"),
                _metric("click latency", cfg, "warm click, median", r.get("click_warm_ms_median"), "ms"),
                _metric("click latency", cfg, "warm click, p90", r.get("click_warm_ms_p90"), "ms"),
                _metric("memory", cfg, "peak RSS (embedding + clicks)", r.get("peak_rss_mb"), "MB"),
                _metric("memory", cfg, "peak GPU memory (embedding)", r.get("gpu_peak_mb"), "MB"),
                _metric("memory", cfg, "embedding cache per volume",
                        r.get("cache_mb_per_volume_with_tiles", r.get("cache_mb_per_volume_coarse")), "MB")]
    for e in res.get("extrapolated", []):
        cfg = f"{e['backend']}, {e.get('device', 'cpu')}, {'x'.join(map(str, e['shape_kji']))}"
        out.append(_metric("embedding time", cfg, "embed a volume (extrapolated)", e["embed_s_extrapolated"], "s"))
    return out


def fewshot_metrics(res: dict) -> list[dict]:
    out = []
    for r in res.get("rows", []):
        cfg = f"{r['shots']} labelled case{'s' if r['shots'] != 1 else ''}"
        out += [_metric("few-shot head", cfg, "head training", r["train_s"], "s"),
                _metric("few-shot head", cfg, "apply per case", r["apply_s_mean"], "s"),
                _metric("few-shot quality", cfg, "mean Dice", r["mean_dice"], "")]
    out.append(_metric("memory", "few-shot benchmark", "peak RSS (few-shot)", res.get("peak_rss_mb"), "MB"))
    return out


def real_metrics(res: dict) -> list[dict]:
    out = []
    for r in res.get("summary", []):
        cfg = f"{r['group']}, {r['method']}"
        out += [_metric("landmark transfer (real data)", cfg, "mean error", r.get("mean_mm"), "mm"),
                _metric("landmark transfer (real data)", cfg, "time per pair", r.get("seconds_per_pair"), "s")]
    out.append(_metric("memory", "real-data benchmark", "peak RSS (real data)", res.get("peak_rss_mb"), "MB"))
    return out


EXTRACT: dict[str, Callable[[dict], list[dict]]] = {
    "training": training_metrics, "embedding": embedding_metrics, "fewshot": fewshot_metrics, "real": real_metrics}


def _machine_of(res: dict) -> dict | None:
    m = res.get("machine") or res.get("meta") or {}
    return {k: m.get(k) for k in MACHINE_KEYS} if "cpu_model" in m else None


def _fmt(value: float) -> str:
    """Four significant digits (whole numbers from 1000 on): the Markdown shows the JSON's numbers."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def summary_markdown(summary: dict) -> list[str]:
    m = summary["machine"]
    lines = ["# Benchmark summary", "", machine_line(m), "",
             f"Command: `{summary['command']}`" + (" (tiny sizes: a check that everything runs, not a measurement)"
                                                    if summary["quick"] else ""), ""]
    lines += ["## Results", "", *md_table(
        ["benchmark", "category", "configuration", "metric", "value", "unit"],
        [[name, x["category"], x["config"], x["metric"], _fmt(x["value"]), x["unit"] or "-"]
         for name, b in summary["benchmarks"].items() for x in b["metrics"]])]
    lines += ["", "## Benchmark processes", "", *md_table(
        ["benchmark", "status", "date", "wall time (s)", "peak RSS (MB)", "details"],
        [[name, b["status"], b.get("date") or "-", _fmt(b["wall_s"]) if b.get("wall_s") else "-",
          _fmt(b["peak_rss_mb"]) if b.get("peak_rss_mb") else "-", f"[{name}.md]({name}.md)"]
         for name, b in summary["benchmarks"].items()])]
    lines += ["", ("Peak RSS of a process: the largest resident memory of the benchmark process and of the "
                  "processes it started (outside --quick, each embedding configuration runs in its own)."),
              "", "## Machine", "",
              *machine_table(m)]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about a minute): checks that everything runs")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS + OPTIONAL,
                    help=f"run only these (default: {', '.join(BENCHMARKS)}; {', '.join(OPTIONAL)} only when named)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cpu: CPU only; cuda: the GPU (embedding: GPU backends only, at full size); "
                         "auto: CPU, and the GPU when present")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per benchmark (default 2)")
    ap.add_argument("--fewshot-model", help="model for the few-shot benchmark (default: it trains the tiny AEFM)")
    ap.add_argument("--full-embedding", action="store_true",
                    help="measure 256^3 and 300x512x512 on a CPU too (instead of 128^3 and extrapolation)")
    ap.add_argument("--real-model", action="append",
                    help="model for the real-data benchmark (repeatable; default: a small AEFM trained for 180 s)")
    ap.add_argument("--real-data", help="the real sample volumes for the real-data benchmark (default ../shared/data)")
    ap.add_argument("--out", help="results folder (default: benchmarks/results; with --quick a new temporary "
                                  "folder, so that smoke numbers never replace measurements)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out or (tempfile.mkdtemp(prefix="bench_quick_") if args.quick else HERE / "results")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    selected = args.only or list(BENCHMARKS)
    runs: dict[str, dict] = {}
    for name in selected:
        cmd = bench_command(name, args, out)
        log.info("[%d/%d] %s: %s", selected.index(name) + 1, len(selected), name, " ".join(cmd[1:]))
        run = run_one(cmd, env)
        run["command"] = " ".join(["python", os.path.relpath(cmd[1], Path.cwd())] + cmd[2:])
        log.info("      %s in %.1f s, peak RSS %.0f MB", "done" if run["returncode"] == 0 else
                 f"FAILED (exit code {run['returncode']})", run["wall_s"], run["peak_rss_mb"])
        if run["returncode"] != 0:
            log.error(run["log_tail"])
        runs[name] = run

    benchmarks: dict[str, dict] = {}
    machine = None
    for name in BENCHMARKS + OPTIONAL:
        path = out / f"{name}.json"
        run = runs.get(name)
        if run is None and not path.is_file():
            continue
        entry: dict[str, Any] = {"results": f"{name}.json", "metrics": []}
        if run is not None:
            entry.update(status="ok" if run["returncode"] == 0 else f"failed (exit code {run['returncode']})",
                         wall_s=run["wall_s"], peak_rss_mb=run["peak_rss_mb"], command=run["command"])
            if run["returncode"] != 0:
                entry["log_tail"] = run["log_tail"][-1500:]
        else:
            entry["status"] = "earlier run"
        fresh = (run is None or run["returncode"] == 0
                 or path.is_file() and path.stat().st_mtime > time.time() - run["wall_s"])
        if path.is_file() and fresh:  # never a stale file left by an earlier run of a benchmark that failed now
            res = json.loads(path.read_text(encoding="utf-8"))
            entry["metrics"] = [x for x in EXTRACT[name](res) if x is not None]
            meta = res.get("meta") or res.get("env") or {}
            entry["date"] = meta.get("date") or meta.get("time")
            if run is not None and run["returncode"] == 0:
                machine = machine or _machine_of(res)
        benchmarks[name] = entry
    # The benchmarks describe the machine they ran on; computing it here would import torch once more.
    machine = machine or machine_description(args.threads)
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = {"machine": machine, "command": command.strip(), "quick": args.quick, "categories": list(CATEGORIES),
               "benchmarks": benchmarks}
    js, md = write_results(out, "summary", summary, summary_markdown(summary))
    log.info("summary: %s and %s", js, md)
    failed = [n for n, r in runs.items() if r["returncode"] != 0]
    if failed:
        log.error("failed: %s (see the output above)", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
