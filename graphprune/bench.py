"""Side-by-side ONNX Runtime benchmark: latency, throughput, parameters, file size, memory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from graphprune import runtime
from graphprune.ir import load_model


@dataclass(frozen=True)
class BenchResult:
    path: str
    params: int
    file_bytes: int
    batch: int
    latency_ms_median: float
    latency_ms_p90: float
    throughput: float  # samples per second
    rss_delta_mb: float

    def to_json(self) -> dict:
        return asdict(self)


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def bench_models(paths: list[Path], batch: int = 1, threads: int = 2, runs: int = 50, warmup: int = 5,
                 seed: int = 0, feeds: dict[str, np.ndarray] | None = None) -> list[BenchResult]:
    """Time every model in round-robin order so machine noise hits them alike.

    Inputs are random with every dynamic dim set to `batch`, unless `feeds` gives them (e.g. real
    token ids of a batch and sequence length of your choice); the first axis counts the samples.
    """
    given = feeds
    if paths:  # load ORT's kernels once so the first model's memory is not charged with them
        runtime.session(load_model(paths[0]).to_onnx(), threads=threads)
    loaded = []
    for path in paths:
        model = load_model(path)
        proto = model.to_onnx()
        before = _rss_mb()
        sess = runtime.session(proto, threads=threads)
        feeds = given if given is not None else runtime.sample_inputs(proto, seed=seed, dynamic_dim=batch)
        for _ in range(warmup):
            sess.run(None, feeds)
        first = next(iter(feeds.values()))
        loaded.append((path, model.param_count(), sess, feeds, _rss_mb() - before,
                       first.shape[0] if first.ndim else 1))
    times = round_robin([(sess, feeds) for _, _, sess, feeds, _, _ in loaded], runs)
    results = []
    for (path, params, _, _, rss, samples), samples_times in zip(loaded, times, strict=True):
        median = float(np.median(samples_times))
        results.append(BenchResult(str(path), params, _file_bytes(path), samples, median * 1e3,
                                   float(np.percentile(samples_times, 90)) * 1e3, samples / median, rss))
    return results


def round_robin(runs_of: list[tuple[object, dict[str, np.ndarray]]], runs: int) -> list[list[float]]:
    """Seconds per run of each (session, feeds), timed in turns so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in runs_of]
    for _ in range(runs):
        for i, (sess, feeds) in enumerate(runs_of):
            start = time.perf_counter()
            sess.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    return times


def relative_latency(reference, candidate, feeds: dict[str, np.ndarray], runs: int = 15, warmup: int = 3) -> float:
    """Median latency of the `candidate` session over the `reference` session's, measured in turns."""
    for _ in range(warmup):
        reference.run(None, feeds)
        candidate.run(None, feeds)
    ref, cand = round_robin([(reference, feeds), (candidate, feeds)], runs)
    return float(np.median(cand) / np.median(ref))


def bench_table(results: list[BenchResult]) -> Table:
    base = results[0]
    table = Table(title=f"ONNX Runtime CPU, batch {base.batch} (speedup vs {Path(base.path).name})")
    for column in ("model", "params", "file MB", "median ms", "p90 ms", "samples/s", "speedup", "RSS +MB"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in results:
        table.add_row(Path(r.path).name, f"{r.params:,}", f"{r.file_bytes / 1e6:.2f}", f"{r.latency_ms_median:.3f}",
                      f"{r.latency_ms_p90:.3f}", f"{r.throughput:,.0f}",
                      f"{base.latency_ms_median / r.latency_ms_median:.2f}x", f"{r.rss_delta_mb:.1f}")
    return table
