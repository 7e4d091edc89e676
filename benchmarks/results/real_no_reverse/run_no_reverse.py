"""bench_real with the robust prior's reversed fit turned off (``PriorConfig.reverse_below=None`` in every fit).

    python benchmarks/results/real_no_reverse/run_no_reverse.py [bench_real arguments]

The ablation behind ``real_no_reverse/real.md``: the matcher's ``fit_prior`` is wrapped so that every fit runs in
the direction asked for.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/

import anatomical_embedding.inference.matching as matching  # noqa: E402

_fit_prior = matching.fit_prior


def _direct_fit(source, target, config=None):
    return _fit_prior(source, target, replace(config or matching.PriorConfig(), reverse_below=None))


matching.fit_prior = _direct_fit

import bench_real  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_real.main(sys.argv[1:]))
