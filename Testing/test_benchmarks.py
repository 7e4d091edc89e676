"""``benchmarks/run_all.py --quick`` runs every benchmark and its summary is complete and self-consistent."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"training", "embedding", "fewshot"}
CATEGORIES = {"training throughput", "embedding time", "click latency", "memory", "few-shot head"}


def markdown_section_table(text: str, heading: str) -> list[list[str]]:
    """Rows (cells stripped, header and separator dropped) of the first table after ``heading``."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) >= 2 and set(rows[1]) <= {"---"}, f"no table under {heading!r}"
    return rows[2:]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_run_summarises_every_benchmark(quick_run):
    out = quick_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["benchmarks"]) == BENCHMARKS
    for name, b in summary["benchmarks"].items():
        assert b["status"] == "ok", (name, b)
        assert b["wall_s"] > 0 and b["peak_rss_mb"] > 50, (name, b)  # a Python process with torch: > 50 MB
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
        assert b["metrics"], name
    m = summary["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["ram_gb"] > 0
    assert m["torch"] and m["onnxruntime"] and m["python"] and m["date"]
    assert "gpu" in m  # None on a CPU machine, the GPU's name otherwise

    metrics = [(name, x) for name, b in summary["benchmarks"].items() for x in b["metrics"]]
    assert CATEGORIES <= {x["category"] for _, x in metrics}
    for name, x in metrics:
        assert math.isfinite(x["value"]), x
        if x["unit"] in ("s", "ms", "MB", "1/s"):
            assert x["value"] > 0, (name, x)
        if x["metric"] == "mean Dice":
            assert 0.0 <= x["value"] <= 1.0

    # Per-click latency and memory for both CPU backends; cold clicks compute fine tiles, warm ones reuse them.
    by_key = {(x["config"], x["metric"]): x["value"] for _, x in metrics}
    for backend in ("torch", "onnxruntime"):
        cfg = f"{backend}, cpu, 48x48x48"
        for metric in ("cold click, median", "cold click, p90", "warm click, median", "warm click, p90",
                       "embed a volume", "peak RSS (embedding + clicks)", "embedding cache per volume"):
            assert (cfg, metric) in by_key, (cfg, metric)
        assert by_key[(cfg, "warm click, median")] < by_key[(cfg, "cold click, median")]
        assert by_key[(cfg, "warm click, median")] <= by_key[(cfg, "warm click, p90")]


@pytest.mark.slow
def test_summary_markdown_shows_the_json_numbers(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text(encoding="utf-8"))
    text = (quick_run / "summary.md").read_text(encoding="utf-8")
    rows = markdown_section_table(text, "## Results")
    expected = [(name, x) for name, b in summary["benchmarks"].items() for x in b["metrics"]]
    assert len(rows) == len(expected)
    for row, (name, x) in zip(rows, expected):
        bench, category, config, metric, value, unit = row
        assert (bench, category, config, metric) == (name, x["category"], x["config"], x["metric"])
        assert unit == (x["unit"] or "-")
        assert float(value) == pytest.approx(x["value"], rel=1e-3), (row, x)

    processes = {r[0]: r for r in markdown_section_table(text, "## Benchmark processes")}
    assert set(processes) == BENCHMARKS
    for name, b in summary["benchmarks"].items():
        assert processes[name][1] == "ok"
        assert float(processes[name][3]) == pytest.approx(b["wall_s"], rel=1e-3)
        assert float(processes[name][4]) == pytest.approx(b["peak_rss_mb"], rel=1e-3)

    machine = {r[0]: r[1] for r in markdown_section_table(text, "## Machine")}
    assert machine["cpu_model"] == summary["machine"]["cpu_model"]
    assert machine["torch"] == summary["machine"]["torch"]


def test_inference_options_smoke_compares_every_configuration(tmp_path):
    """``bench_inference_options.py --smoke``: every backend, precision and session option gets a row; fp32 rows
    agree with torch fp32, and the int8 package really differs (it was quantised) while staying close."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference_options.py"), "--smoke",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300, check=False, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "inference_options.json").read_text())
    rows = {r["config"]: r for r in data["results"]}
    assert len(rows) == 11 and data["meta"]["smoke"] is True
    for name, r in rows.items():
        assert r["coarse_window_s"] > 0 and r["fine_window_s"] > 0, name
        if "fp32" in name or "fp16" in name:
            assert r["cosine_to_torch_fp32"] > 0.9999, name
    assert 0.9 < rows["onnxruntime int8"]["cosine_to_torch_fp32"] < 0.9999
    assert (tmp_path / "inference_options.md").read_text().count("\n| ") == 12  # header + 11 rows
