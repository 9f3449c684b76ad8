"""The machine a benchmark runs on: CPU, versions, load, and its measured memory read bandwidth."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np


def measure_bandwidth(threads: int | None = None, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads each reduce (max) their share of a float32 array."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    data = np.ones(mib * 2**20 // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, chunks))  # first touch
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnxruntime-genai", "executorch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine_info(threads: int | None) -> dict:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "versions": versions(),
    }


class RunConditions:
    """Load and memory bandwidth around a benchmark run: measured at the start and again at finish().

    The roofline uses the higher bandwidth: other tenants of a shared machine only ever lower it.
    """

    def __init__(self, threads: int | None):
        self.threads = threads
        self.load_start = load_average()
        self.bandwidths = [measure_bandwidth(threads)]

    def finish(self) -> tuple[float, dict]:
        """(bandwidth for the roofline in bytes/s, the report's "machine" section)."""
        self.bandwidths.append(measure_bandwidth(self.threads))
        bandwidth = max(self.bandwidths)
        return bandwidth, machine_info(self.threads) | {
            "memory_bandwidth_gb_s": bandwidth / 1e9,
            "memory_bandwidth_measured_gb_s": [b / 1e9 for b in self.bandwidths],
            "load_average_start": self.load_start,
            "load_average_end": load_average(),
        }
