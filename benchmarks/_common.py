"""Shared helpers of the benchmark scripts: the machine description and the JSON + Markdown writers.

Every ``bench_*.py`` script and ``run_all.py`` records the same machine description so that numbers
from different runs (a shared 2-core CPU, a GPU node) can be told apart and compared.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
        return (proc.stdout.strip() or None) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description(threads: int | None = None) -> dict[str, Any]:
    """CPU model and cores, RAM, GPU, library versions, load and time: enough to interpret a timing.

    Imports torch (already imported by every benchmark) for the GPU name and CUDA version.
    """
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "threads": threads,
        "ram_gb": _ram_gb(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cuda": torch.version.cuda if gpu else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


#: The keys of :func:`machine_description` (benchmark metadata adds its own keys next to them).
MACHINE_KEYS = ("cpu_model", "cpu_count", "cpu_usable", "threads", "ram_gb", "gpu", "gpu_count", "cuda", "platform",
                "python", "torch", "onnxruntime", "numpy", "git_commit", "load_average_1min", "date")


def machine_line(m: dict[str, Any]) -> str:
    """One Markdown sentence describing the machine (for the top of each results file)."""
    threads = f", {m['threads']} threads" if m.get("threads") else ""
    return (f"{m['date']}: {m['cpu_model']} ({m['cpu_usable']} of {m['cpu_count']} CPUs usable{threads}), "
            f"{m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
            f"python {m['python']}, {m['platform']}; 1-min load average {m['load_average_1min']} "
            "(CPU figures are slower on a shared machine).")


def machine_table(m: dict[str, Any]) -> list[str]:
    """The machine description as a two-column Markdown table."""
    return md_table(["item", "value"], [[k, "-" if v is None else v] for k, v in m.items()])


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Markdown table lines (cells are ``str()``-ed; format numbers before)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def write_results(out: str | Path, name: str, payload: dict, md_lines: Sequence[str]) -> tuple[Path, Path]:
    """Write ``OUT/NAME.json`` and ``OUT/NAME.md`` atomically (a crash never leaves half a results file)."""
    from anatomical_embedding.io import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, default=float)
    js = atomic_write(out / f"{name}.json", lambda p: p.write_text(text, encoding="utf-8"), overwrite=True)
    md_text = "\n".join(md_lines).rstrip("\n") + "\n"
    md = atomic_write(out / f"{name}.md", lambda p: p.write_text(md_text, encoding="utf-8"), overwrite=True)
    return js, md


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
