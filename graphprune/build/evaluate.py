"""The build's verify and bench steps over every model it made.

verify: each model passes onnx.checker, loads and runs in ONNX Runtime on the evaluation data, keeps
the dense model's output shapes, and gets a quality figure against the dense model's outputs —
embedding cosine (text encoders: mean-pooled over the attention mask), top-1 agreement and
accuracy (classifiers; accuracy where the data has labels), or the cosine of the outputs.
bench: every model timed interleaved in one run (`graphprune bench`), on the evaluation data.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from graphprune import runtime
from graphprune.build.stages import StageError
from graphprune.errors import VerificationError
from graphprune.ir.model import check_model, first_line
from graphprune.tools.bench import bench_models, providers_for
from graphprune.tools.text import mean_pool

if TYPE_CHECKING:
    from graphprune.build.data import Data
    from graphprune.build.runner import Step
    from graphprune.build.stages import Context

logger = logging.getLogger(__name__)

CHUNK = 16  # evaluation samples per ORT run


def _check(path) -> None:
    """onnx.checker, with ONNX Runtime's default-domain ops known (SimplifiedLayerNormalization)."""
    try:
        check_model(onnx.load(str(path)))
    except Exception as exc:
        raise VerificationError(f"{path}: ONNX checker failed: {first_line(exc)}") from exc


def _outputs(path, feeds: dict[str, np.ndarray], provider: str, threads: int) -> np.ndarray:
    _check(path)
    session = runtime.session(onnx.load(str(path)), threads=threads, providers=providers_for(provider))
    names = {i.name for i in session.get_inputs()}
    count = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i:i + CHUNK] for k, v in feeds.items() if k in names})[0]
             for i in range(0, count, CHUNK)]
    return np.concatenate(parts)


def _rows(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(len(values), -1).astype(np.float64)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def quality(got: np.ndarray, dense: np.ndarray, feeds: dict[str, np.ndarray], labels: np.ndarray | None,
            ) -> dict[str, float]:
    """Quality figures of `got` against the dense model's outputs `dense` (same inputs)."""
    figures: dict[str, float] = {}
    if got.ndim == 3 and "attention_mask" in feeds:
        mask = feeds["attention_mask"]
        figures["cosine"] = float(np.mean(np.sum(mean_pool(got, mask) * mean_pool(dense, mask), axis=1)))
    else:
        figures["cosine"] = float(np.mean(np.sum(_rows(got) * _rows(dense), axis=1)))
    if got.ndim == 2 and got.shape[1] > 1:
        figures["agreement"] = float(np.mean(got.argmax(axis=1) == dense.argmax(axis=1)))
        if labels is not None:
            figures["accuracy"] = float(np.mean(got.argmax(axis=1) == labels))
    return figures


def primary_metric(metric: str, figures: dict[str, float]) -> str:
    if metric != "auto":
        return metric
    return next(name for name in ("accuracy", "agreement", "cosine") if name in figures)


def verify_all(ctx: Context, models: list[Step]) -> dict[str, Any]:
    """Check and score every model (see the module doc); the dense model is the reference."""
    assert ctx.dense is not None
    build, verify = ctx.config["build"], ctx.config["verify"]
    data = ctx.data("evaluation", ctx.dense)
    provider, threads = build["provider"], build["threads"]
    if data.windows is not None:
        return _verify_causal(ctx, models, data)
    reference = _outputs(ctx.dense, data.feeds, provider, threads)
    rows: dict[str, Any] = {"data": data.description, "models": {}}
    final = _final(models)
    candidates = [("dense", ctx.dense)] + [(s.label, s.model) for s in models if s.name != "export"]
    for label, path in candidates:
        got = reference if label == "dense" else _outputs(path, data.feeds, provider, threads)
        if got.shape != reference.shape:
            raise VerificationError(f"{label}: output shape {list(got.shape)} differs from the dense model's "
                                    f"{list(reference.shape)}")
        figures = quality(got, reference, data.feeds, data.labels)
        metric = primary_metric(verify["metric"], figures)
        if metric not in figures:
            raise StageError(f"[verify] metric {metric} does not apply to these outputs (have: {', '.join(figures)})")
        rows["models"][label] = {"checker": True, "runs": True, "output_shape": list(got.shape),
                                 "quality": figures, "metric": metric, "value": figures[metric]}
        floor = verify.get("min_quality")
        if floor is not None and label == final and figures[metric] < floor:
            raise VerificationError(f"{label}: {metric} {figures[metric]:.4f} is below [verify] min_quality {floor}")
    return rows


def _final(models: list[Step]) -> str | None:
    """The label of the model the build ships (the last one made from the pruned chain): the one
    [verify] min_quality / max_perplexity_ratio judge; intermediate ones are reported only."""
    chain = [s.label for s in models if not s.reference and s.name != "export"]
    return chain[-1] if chain else None


def _verify_causal(ctx: Context, models: list[Step], data: Data) -> dict[str, Any]:
    """A causal LM: perplexity of every model on the evaluation windows (each window alone, empty
    KV cache), and its ratio to the dense model's."""
    from graphprune.ir.model import load_model
    from graphprune.tools.perplexity import perplexity

    assert ctx.dense is not None and data.windows is not None
    threads, ceiling = ctx.config["build"]["threads"], ctx.config["verify"]["max_perplexity_ratio"]
    providers = providers_for(ctx.config["build"]["provider"])
    _check(ctx.dense)
    dense = perplexity(load_model(ctx.dense), data.windows, threads, providers=providers).perplexity
    rows: dict[str, Any] = {"data": data.description, "models": {}}
    final = _final(models)
    for label, path in [("dense", ctx.dense)] + [(s.label, s.model) for s in models if s.name != "export"]:
        _check(path)
        value = dense if label == "dense" else \
            perplexity(load_model(path), data.windows, threads, providers=providers).perplexity
        figures = {"perplexity": value, "perplexity_ratio": value / dense}
        rows["models"][label] = {"checker": True, "runs": True, "quality": figures, "metric": "perplexity",
                                 "value": value}
        if ceiling is not None and label == final and value / dense > ceiling:
            raise VerificationError(f"{label}: perplexity {value:.3f} is x{value / dense:.3f} the dense model's, "
                                    f"above [verify] max_perplexity_ratio {ceiling}")
    return rows


def bench_all(ctx: Context, models: list[Step]) -> dict[str, Any]:
    """Every model (dense first) timed interleaved in one run, on the evaluation data."""
    assert ctx.dense is not None
    build, bench = ctx.config["build"], ctx.config["bench"]
    data = ctx.data("evaluation", ctx.dense)
    batch = bench["batch"]
    if len(next(iter(data.feeds.values()))) < batch:
        raise StageError(f"[bench] batch {batch} is more than the [data] eval_samples")
    labelled = [("dense", ctx.dense)] + [(s.label, s.model) for s in models if s.name != "export"]
    results = bench_models([path for _, path in labelled], batch=batch, threads=bench["threads"] or build["threads"],
                           runs=bench["runs"], warmup=bench["warmup"], repeats=bench["repeats"],
                           feeds={k: v[:batch] for k, v in data.feeds.items()},
                           provider=build["provider"])
    return {"data": f"the first {batch} of {data.description}",
            "models": {label: result.to_json() for (label, _), result in zip(labelled, results, strict=True)}}
