"""Tiny shared benchmark harness: repeated timing with the median, peak RSS, ratios against a baseline.

Every benchmark measures its baseline in the same run (the host is noisy: runs vary up to 2x) and prints
ratios, so a figure is never compared with one taken on another day.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRAINFLOW_SHARED", ROOT.parent / "shared"))


MOBILENET_V2_224 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def add_real_data_args(parser: Any, dataset: str = "cats_vs_dogs") -> None:
    """The options of the benchmarks on real photos and weights: ``--dataset``, ``--weights`` (MobileNetV2 1.0 at
    224, the real ImageNet file, by path) and ``--out`` (the raw figures as JSON)."""
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / dataset)
    parser.add_argument("--weights", type=Path, default=MOBILENET_V2_224)
    parser.add_argument("--out", type=Path, default=None, help="save the raw figures as JSON here")


@dataclass
class Timing:
    name: str
    items: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Items per second at the median time."""
        return self.items / self.median if self.median > 0 else float("inf")

    def line(self, unit: str = "img/s") -> str:
        spread = f"{min(self.seconds):.2f}-{max(self.seconds):.2f}s" if self.seconds else "-"
        return f"{self.name:<48} {self.rate:10.1f} {unit}   median {self.median:.2f}s  ({spread}, n={len(self.seconds)})"


def time_it(name: str, items: int, fn: Callable[[], object], repeats: int = 3, warmup: int = 0) -> Timing:
    """Run ``fn`` ``warmup`` + ``repeats`` times; keep the wall times of the repeats."""
    for _ in range(warmup):
        fn()
    timing = Timing(name, items)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timing.seconds.append(time.perf_counter() - start)
    return timing


def ratio(numerator: Timing, denominator: Timing) -> float:
    """Throughput ratio numerator / denominator (> 1: the numerator is faster)."""
    return numerator.rate / denominator.rate


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child_peak_rss(args: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``python args...`` in a fresh process; return (its peak RSS in MiB, its stdout)."""
    code = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    ).stdout
    kb = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_KB"))
    return kb / 1024, out


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def report(title: str, lines: list[str], figures: dict[str, object], out: Path | None = None) -> None:
    """Print a block for BENCHMARKS.md and optionally save the raw figures as JSON."""
    print(f"\n## {title}\nmachine: {machine()}")
    for line in lines:
        print(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"title": title, "machine": machine(), **figures}, indent=2, default=str))


def as_dict(t: Timing) -> dict[str, object]:
    return {**asdict(t), "median": t.median, "rate": t.rate}
