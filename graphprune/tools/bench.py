"""Side-by-side ONNX Runtime benchmark: latency percentiles, throughput, parameters, MACs, file size,
peak session memory, and the speedup of every model against the first.

Method: all sessions are created first, then timed interleaved (A, B, A, B, ...) in `repeats`
rounds of `runs` runs each, so machine noise hits every model alike, with the process pinned to
as many CPUs as ORT has threads. Per round, each model's
median latency over the first model's gives a speedup; the spread of those per-round speedups
(min..max) says how far to trust the figure. Sessions do not spin idle threads (see
`runtime.session`), so one model's threads do not steal the cores of the one being timed.
Peak memory is measured per model in a fresh child process: the growth of its resident set from
before the session is created to the peak during warm-up runs.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from rich.table import Table

from graphprune import runtime
from graphprune.analysis import cost
from graphprune.analysis.state import cache_pairs, fit_empty_inputs
from graphprune.errors import OptionError
from graphprune.ir.model import Model, load_model, model_bytes
from graphprune.tools.perplexity import causal_feeds

logger = logging.getLogger(__name__)

#: the symbolic dims that are not the batch take this size unless --seq or --shape says otherwise
DEFAULT_SEQ = 128
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class BenchResult:
    """One model's figures (JSON/CSV fields; times in milliseconds per run of one batch)."""

    path: str
    params: int  # weights in initializers
    macs: int  # multiply-accumulates at the benchmarked input shapes
    file_bytes: int  # the .onnx file plus its external data
    batch: int  # samples per run (first axis of the first input)
    provider: str  # the ORT execution provider that ran it
    shapes: dict[str, list[int]]  # the input shapes used
    latency_ms_median: float  # p50 over every timed run
    latency_ms_p90: float
    latency_ms_p99: float
    throughput: float  # samples per second at the median latency
    peak_memory_mb: float | None  # resident-set growth of a fresh process: session creation + runs
    speedup: float  # the first model's median latency over this one's (1.0 for the first)
    speedup_rounds: list[float] = field(default_factory=list)  # the same ratio per repeat round

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def spread(self) -> tuple[float, float]:
        rounds = self.speedup_rounds or [self.speedup]
        return min(rounds), max(rounds)


CSV_FIELDS = ("path", "params", "macs", "file_bytes", "batch", "provider", "shapes", "latency_ms_median",
              "latency_ms_p90", "latency_ms_p99", "throughput", "peak_memory_mb", "speedup", "speedup_min",
              "speedup_max")


def providers_for(name: str) -> list[str]:
    """ORT providers for `--provider cpu|cuda`; CUDA falls back to CPU with a warning when the
    installed onnxruntime has no CUDA provider."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise OptionError(f"unknown provider '{name}' (choose {', '.join(PROVIDERS)})")
    wanted = PROVIDERS[name]
    if wanted not in ort.get_available_providers():
        logger.warning("this onnxruntime has no %s (it has: %s); running on CPU", wanted,
                       ", ".join(ort.get_available_providers()))
        return [PROVIDERS["cpu"]]
    return [wanted, PROVIDERS["cpu"]] if wanted != PROVIDERS["cpu"] else [wanted]


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`name=1x3x224x224` strings as {name: [1, 3, 224, 224]}."""
    shapes = {}
    for spec in specs or []:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise OptionError(f"--shape {spec!r}: give NAME=DIMxDIMx... with whole numbers, e.g. "
                              "image=1x3x224x224") from None
        if not name or not shapes[name] or min(shapes[name]) < 1:
            raise OptionError(f"--shape {spec!r}: give NAME=DIMxDIMx... with positive dims")
    return shapes


def input_shapes(proto: onnx.ModelProto, batch: int, seq: int, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Concrete shapes of every model input: `shapes` where given, else static dims as they are, a
    symbolic first axis = `batch`, other symbolic axes = `seq`."""
    from graphprune.calib import model_inputs

    inputs = model_inputs(proto)
    unknown = set(shapes) - {v.name for v in inputs}
    if unknown:
        raise OptionError(f"--shape names no input of {proto.graph.name or 'the model'}: {', '.join(sorted(unknown))} "
                          f"(inputs: {', '.join(v.name for v in inputs)})")
    result = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in shapes:
            given = shapes[value.name]
            if len(given) != len(dims) or any(d.HasField("dim_value") and d.dim_value != g
                                               for d, g in zip(dims, given, strict=False)):
                raise OptionError(f"--shape {value.name}={'x'.join(map(str, given))} does not fit the input's "
                                  f"shape {[d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims]}")
            result[value.name] = list(given)
        else:
            result[value.name] = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq)
                                  for i, d in enumerate(dims)]
    return result


def random_feeds(proto: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the given shapes (integer inputs such as token ids draw 0 or 1)."""
    from graphprune.calib import model_inputs

    rng = np.random.default_rng(seed)
    return {value.name: runtime.random_input(rng, value.name, shapes[value.name],
                                             onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
            for value in model_inputs(proto)}


def macs_at(model: Model, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates with the inputs fixed to `shapes` (every dim known, so attention's
    sequence x sequence products count in full)."""
    fixed = model.copy()
    for tensor in fixed.graph.inputs:
        if tensor.name in shapes:
            tensor.shape = list(shapes[tensor.name])
    for tensor in fixed.graph.outputs:  # re-derived from the fixed inputs, not the declared symbols
        tensor.shape = None
    try:
        fixed.infer_shapes()
    except Exception as exc:  # counting is a courtesy: a model ORT runs is still benchmarked
        logger.warning("cannot infer shapes of %s at the benchmark shapes (%s): MACs counted with symbolic dims "
                       "as 1", model.source, exc)
        return cost.totals(model).macs
    return cost.totals(fixed).macs


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _peak_memory_child(path: str, feeds: dict[str, np.ndarray], threads: int, providers: list[str], runs: int,
                       queue) -> None:
    try:
        model = load_model(path)  # its mapped weights back the proto's references
        proto = model.to_onnx()
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak from the current resident set
        base = _rss_kb("VmRSS")
        sess = runtime.session(proto, threads=threads, providers=providers)
        for _ in range(runs):
            sess.run(None, feeds)
        queue.put((_rss_kb("VmHWM") - base) / 1024)
    except Exception as exc:  # reported as "unknown", never fatal for the timing
        queue.put(f"{type(exc).__name__}: {exc}")


def peak_memory_mb(path: Path, feeds: dict[str, np.ndarray], threads: int, providers: list[str],
                   runs: int = 2) -> float | None:
    """Resident-set growth of a fresh process that loads the model, creates its session and runs it.
    The model is loaded before the baseline, so this is the session's own memory: its copy of the
    weights, prepacked kernels and activation buffers. None where /proc is not available."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child, args=(str(path), feeds, threads, providers, runs, queue))
    child.start()
    child.join()
    result = queue.get() if not queue.empty() else "no result"
    if isinstance(result, str):
        logger.warning("peak memory of %s unknown: %s", path, result)
        return None
    return round(result, 1)


def bench_models(paths: list[Path], batch: int = 1, threads: int = 2, runs: int = 50, warmup: int = 5,
                 seed: int = 0, feeds: dict[str, np.ndarray] | None = None, seq: int = DEFAULT_SEQ,
                 shapes: dict[str, list[int]] | None = None, repeats: int = 1, provider: str = "cpu",
                 memory: bool = False) -> list[BenchResult]:
    """Time every model interleaved (see module doc) and gather its figures.

    Inputs are seeded random ones with symbolic dims set from `batch` (first axis), `seq` (other
    axes) and `shapes` (explicit, per input name), unless `feeds` gives them (e.g. real token ids);
    models with different inputs each get their own. A decoder with a KV cache runs a prefill:
    `batch` x `seq` token ids with empty caches (fitted to each model's heads). `memory` adds the peak session memory (a
    child process per model: a few seconds each).
    """
    if min(batch, threads, runs, repeats, seq) < 1 or warmup < 0:
        raise OptionError("batch, threads, runs, repeats and seq must be at least 1, warmup at least 0")
    chosen = providers_for(provider)
    given = feeds
    loaded = []
    for path in paths:
        model = load_model(path)
        proto = model.to_onnx()
        if given is not None:  # a pruned KV cache has fewer heads: its empty caches are fitted to it
            model_feeds = fit_empty_inputs({t.name: t.shape for t in model.graph.inputs}, given)
        elif cache_pairs(model) and not shapes:  # a decoder's prefill: batch x seq tokens, empty caches
            model_feeds = causal_feeds(model, np.random.default_rng(seed).integers(0, 2, (batch, seq)))
        else:
            model_feeds = random_feeds(proto, input_shapes(proto, batch, seq, shapes or {}), seed)
        model_shapes = {name: list(array.shape) for name, array in model_feeds.items()}
        sess = runtime.session(proto, threads=threads, providers=chosen)
        for _ in range(warmup):
            sess.run(None, model_feeds)
        first = next(iter(model_feeds.values()))
        loaded.append((path, model, sess, model_feeds, model_shapes, first.shape[0] if first.ndim else 1))
    times: list[list[float]] = [[] for _ in loaded]
    per_round: list[list[float]] = [[] for _ in loaded]
    with pinned(threads):
        for _ in range(repeats):
            round_times = round_robin([(sess, f) for _, _, sess, f, _, _ in loaded], runs)
            for i, values in enumerate(round_times):
                times[i] += values
                per_round[i].append(float(np.median(values)))
    base_median = float(np.median(times[0])) if loaded else 1.0
    results = []
    for i, (path, model, sess, model_feeds, model_shapes, samples) in enumerate(loaded):
        median = float(np.median(times[i]))
        rounds = [round(per_round[0][r] / per_round[i][r], 4) for r in range(repeats)]
        peak = peak_memory_mb(path, model_feeds, threads, chosen) if memory else None
        results.append(BenchResult(
            str(path), model.param_count(), macs_at(model, model_shapes), model_bytes(path), samples,
            sess.get_providers()[0], model_shapes, median * 1e3, float(np.percentile(times[i], 90)) * 1e3,
            float(np.percentile(times[i], 99)) * 1e3, samples / median, peak, base_median / median, rounds))
    return results


@contextlib.contextmanager
def pinned(threads: int):
    """Keep the process (and so every ORT thread) on the same `threads` CPUs while timing, so the
    scheduler does not move the work between cores from one run to the next; no-op where the OS
    has no CPU affinity."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:max(threads, 1)])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Session(Protocol):
    """What timing needs of an ONNX Runtime session."""

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray]) -> Any: ...


def round_robin(runs_of: list[tuple[Session, dict[str, np.ndarray]]], runs: int) -> list[list[float]]:
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


def write_csv(results: list[BenchResult], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {k: v for k, v in r.to_json().items() if k in CSV_FIELDS}
            row["shapes"] = ";".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in r.shapes.items())
            row["speedup_min"], row["speedup_max"] = r.spread
            writer.writerow(row)


def bench_table(results: list[BenchResult]) -> Table:
    base = results[0]
    shapes = ", ".join(f"{name} {'x'.join(map(str, dims))}" for name, dims in base.shapes.items())
    table = Table(title=f"ONNX Runtime {base.provider.replace('ExecutionProvider', '')}: {shapes} "
                        f"(speedup vs {Path(base.path).name}; spread: per-round min-max)")
    for column in ("model", "params", "MACs", "file MB", "p50 ms", "p90 ms", "p99 ms", "samples/s", "peak MB",
                   "speedup", "spread"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in results:
        low, high = r.spread
        table.add_row(Path(r.path).name, f"{r.params:,}", f"{r.macs:,}", f"{r.file_bytes / 1e6:.2f}",
                      f"{r.latency_ms_median:.3f}", f"{r.latency_ms_p90:.3f}", f"{r.latency_ms_p99:.3f}",
                      f"{r.throughput:,.0f}", "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.1f}",
                      f"{r.speedup:.2f}x", f"{low:.2f}-{high:.2f}")
    return table
