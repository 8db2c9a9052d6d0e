"""`graphprune sweep`: prune one model at several ratios and measure what each costs and buys.

For every ratio the dense model is pruned with the same options (verified as `prune` verifies),
saved, and compared with the dense model on the calibration inputs (fidelity); then all models are
timed side by side with `graphprune.tools.bench` (interleaved rounds, so the speedups are measured in one
run). The result is a table, `sweep.json`, `sweep.csv` and `sweep.png`: latency against fidelity,
the trade-off curve a user picks a point on.

Fidelity, per float output, over the calibration samples: the mean cosine between each sample's
pruned and dense output (flattened; padding positions of text inputs left out), and for 2-D outputs
(classifier logits) the share of samples whose top-1 class is unchanged.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graphprune import api, runtime
from graphprune.analysis.state import state_tensors
from graphprune.calib import batches, positions
from graphprune.errors import OptionError
from graphprune.ir.model import load_model, save_model
from graphprune.pipeline import take_state
from graphprune.tools.bench import bench_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPoint:
    ratio: float  # 0 for the dense model
    path: str
    params: int
    macs: int
    latency_ms: float  # median
    speedup: float  # dense median / this median, measured side by side
    speedup_rounds: list[float]
    cosine: float  # mean per-sample cosine to the dense outputs
    top1_agreement: float | None  # 2-D outputs only
    perplexity: float | None = None  # causal LMs, on the held-out `eval_windows`


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    model = load_model(path)  # its mapped weights back the proto's references
    session = runtime.session(model.to_onnx(), threads=2)
    return [[np.asarray(o) for o in session.run(None, chunk)] for chunk in batches(feeds, 32)]


def fidelity(dense: list[list[np.ndarray]], pruned: list[list[np.ndarray]],
             feeds: dict[str, np.ndarray], skip: frozenset[int] = frozenset()) -> tuple[float, float | None]:
    """(mean per-sample cosine over float outputs, top-1 agreement of 2-D outputs or None); the
    outputs at positions `skip` (a KV cache's presents: state, not predictions) are left out."""
    cosines, agree = [], []
    for chunk, ours, theirs in zip(batches(feeds, 32), pruned, dense, strict=True):
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if not np.issubdtype(a.dtype, np.floating) or index in skip:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            mask = positions(chunk, b64)
            if mask is not None:
                a64 = a64 * mask.reshape(mask.shape + (1,) * (a64.ndim - 2))
                b64 = b64 * mask.reshape(mask.shape + (1,) * (b64.ndim - 2))
            a2, b2 = a64.reshape(len(a64), -1), b64.reshape(len(b64), -1)
            norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
            cosines += list(np.sum(a2 * b2, axis=1) / np.maximum(norms, 1e-30))
            if a.ndim == 2 and a.shape[1] > 1:
                agree += list(np.argmax(a, axis=1) == np.argmax(b, axis=1))
    return float(np.mean(cosines)) if cosines else float("nan"), float(np.mean(agree)) if agree else None


def sweep(dense_path: Path, ratios: list[float], out: Path, feeds: dict[str, np.ndarray],
          prune_options: dict, calibration: dict[str, np.ndarray] | None = None, labels=None,
          bench_options: dict | None = None,
          progress: Callable[[str], None] | None = None,
          eval_windows: np.ndarray | None = None) -> list[SweepPoint]:
    """Prune `dense_path` at each ratio into `out`, measure, and write sweep.json/.csv/.png there;
    `eval_windows` (token windows of held-out text): each model's perplexity too (causal LMs)."""
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise OptionError(f"--ratios must be fractions in (0, 1), got {ratios}")
    if len(set(ratios)) != len(ratios):
        raise OptionError(f"--ratios has repeats: {ratios}")
    out.mkdir(parents=True, exist_ok=True)
    def say(text: str) -> None:
        logger.info("sweep: %s", text)
        if progress:
            progress(text)

    reference = _outputs(dense_path, feeds)
    dense = load_model(dense_path)
    state = state_tensors(dense)
    skip = frozenset(i for i, t in enumerate(dense.graph.outputs) if t.name in state)
    paths, scores = [dense_path], [(1.0, fidelity(reference, reference, feeds, skip)[1])]
    for ratio in sorted(ratios):
        say(f"pruning {ratio:.0%}")
        model = load_model(dense_path)
        report = api.prune(model, ratio=ratio, calibration=calibration, labels=labels, **prune_options)
        path = save_model(model, out / f"ratio-{round(ratio * 100):02d}.onnx")
        paths.append(path)
        ours = take_state(feeds, report.state)  # without the cache heads the model lost
        scores.append(fidelity(reference, _outputs(path, ours), feeds, skip))
    perplexities: list[float | None] = [None] * len(paths)
    if eval_windows is not None:
        from graphprune.tools.perplexity import perplexity

        say(f"perplexity of {len(paths)} models on {len(eval_windows)} windows")
        perplexities = [round(perplexity(load_model(path), eval_windows).perplexity, 4) for path in paths]
    say(f"timing {len(paths)} models side by side")
    timed = bench_models(paths, **(bench_options or {}))
    points = [SweepPoint(ratio, str(path), t.params, t.macs, round(t.latency_ms_median, 4), round(t.speedup, 4),
                         t.speedup_rounds, round(cos, 5), None if top1 is None else round(top1, 4), ppl)
              for ratio, path, t, (cos, top1), ppl in zip([0.0] + sorted(ratios), paths, timed, scores, perplexities,
                                                          strict=True)]
    (out / "sweep.json").write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f for f in asdict(points[0]) if f != "speedup_rounds"])
        writer.writeheader()
        for point in points:
            writer.writerow({k: v for k, v in asdict(point).items() if k != "speedup_rounds"})
    plot_sweep(points, out / "sweep.png", title=f"{Path(dense_path).name}: latency vs fidelity")
    return points


def plot_sweep(points: list[SweepPoint], path: Path, title: str) -> Path:
    """Latency (ms, left) against fidelity (cosine to dense, bottom), each point labelled with its
    ratio and speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = [p.cosine for p in points]
    y = [p.latency_ms for p in points]
    ax.plot(x, y, color="#135", marker="o", linewidth=1.5)
    for p in points:
        label = "dense" if p.ratio == 0 else f"{p.ratio:.0%} removed, {p.speedup:.2f}x"
        ax.annotate(label, (p.cosine, p.latency_ms), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("fidelity: mean cosine of outputs to the dense model's")
    ax.set_ylabel("median latency per batch (ms, ONNX Runtime)")
    ax.set_title(title)
    ax.invert_xaxis()  # left to right: more pruning
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
