"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.deps import GQA_MODES, Dependencies, analyze
from graphprune.errors import OptionError
from graphprune.ir.model import Model, unshare_constants
from graphprune.pipeline import (
    AnalysisManager,
    Pass,
    PassInputs,
    PassManager,
    Progress,
    Report,
    format_pipeline,
    make_analysis,
    make_pass,
    parse_pipeline,
)
from graphprune.transform.plan import make_plan, validate_budget

logger = logging.getLogger(__name__)


def build_passes(ratio: float | None = None, threshold: float | None = None, importance: str = "l2",
                 round_to: int | None = None, round_mode: str = "up", sparsity: float | None = None,
                 weight_threshold: float | None = None, seed: int = 0, prune_hidden: bool = False,
                 drop_blocks: int | None = None, reconstruct: bool = False, allocation: str = "uniform",
                 head_ratio: float | None = None, neuron_ratio: float | None = None,
                 channel_ratio: float | None = None, target_params: float | None = None,
                 target_flops: float | None = None, target_latency: float | None = None,
                 gqa: str = "kv", uniform_heads: bool = False) -> list[Pass]:
    """The passes for the usual options (what `graphprune prune` runs without --pipeline)."""
    targets = {k: v for k, v in (("target_params", target_params), ("target_flops", target_flops),
                                 ("target_latency", target_latency)) if v is not None}
    structural = ratio is not None or threshold is not None or bool(targets)
    unstructured = sparsity is not None or weight_threshold is not None
    if not structural and not unstructured and not drop_blocks:
        raise OptionError("nothing to do: give --ratio or --threshold (structured), --drop-blocks (depth) "
                          "and/or --sparsity or --weight-threshold (unstructured)")
    if sparsity is not None and weight_threshold is not None:
        raise OptionError("give only one of sparsity and weight-threshold")
    if prune_hidden and not structural:
        raise OptionError("--prune-hidden needs --ratio or --threshold")
    if reconstruct and not structural:
        raise OptionError("--reconstruct needs --ratio or --threshold")
    if gqa not in GQA_MODES:
        raise OptionError(f"--gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    if drop_blocks is not None and drop_blocks < 0:
        raise OptionError(f"--drop-blocks must be >= 0, got {drop_blocks}")
    passes = [make_pass("drop-blocks", count=drop_blocks, seed=seed)] if drop_blocks else []
    if structural:
        if targets:
            if len(targets) > 1 or ratio is not None or threshold is not None:
                raise OptionError("give one budget: --ratio, --threshold, --target-params, --target-flops or "
                                  "--target-latency")
            (key, value), = targets.items()
            if not 0 < value < 1:
                raise OptionError(f"--{key.replace('_', '-')} is the fraction kept, in (0, 1); got {value}")
            budget: dict[str, float | None] = {key: value}
        else:
            validate_budget(ratio, threshold, round_to)
            budget = {"ratio": ratio} if ratio is not None else {"threshold": threshold}
        shares = {"round_to": round_to, "round_mode": round_mode, "hidden": prune_hidden, "head_ratio": head_ratio,
                  "neuron_ratio": neuron_ratio, "channel_ratio": channel_ratio}
        passes += [make_pass("unshare-constants"), make_pass("analyze-deps", gqa=gqa)]
        if reconstruct and importance == "obs" and ratio is not None and allocation == "uniform" \
                and not uniform_heads:
            # scores, removal and refit in one pass over the calibration data, layer by layer
            passes.append(make_pass("prune-sequential", **budget, **shares))
        else:
            passes += [make_pass("score-importance", kind=importance, seed=seed),
                       make_pass("prune-units", **budget, **shares, allocation=allocation, uniform_heads=uniform_heads)]
            # FLAP: its fluctuation metric plus the removed units' mean folded into the next bias
            passes += [make_pass("reconstruct")] if reconstruct else \
                [make_pass("compensate-bias")] if importance == "flap" else []
    if unstructured:
        amount = {"sparsity": sparsity} if sparsity is not None else {"threshold": weight_threshold}
        passes.append(make_pass("sparsify-weights", **amount))
    return passes + [make_pass("cleanup-graph"), make_pass("verify-model")]


def build_pipeline(**options) -> str:
    """The pipeline text of `build_passes(**options)`."""
    return format_pipeline(build_passes(**options))


def prune(model: Model, pipeline: str | None = None, *, saliency: Mapping[str, np.ndarray] | None = None,
          calibration: Mapping[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
          verify: bool = True,
          progress: Progress | None = None, seed: int = 0, **options) -> Report:
    """Prune `model` in place with a pipeline text or the options of `build_passes`.

    `saliency` maps initializer names to per-weight contributions (e.g. from
    `frontend.taylor_saliency` + `frontend.saliency_for`) for `importance="saliency"`;
    `calibration` maps input names to sample arrays (first axis: samples; `graphprune.calib`)
    for `importance="activation"`, `"taylor"`, `"fisher"` and `reconstruct`; `labels` (one per
    calibration sample) make taylor/fisher use the task loss.
    """
    if pipeline is not None and options:
        raise OptionError(f"give either a pipeline or options ({', '.join(options)}), not both")
    if pipeline is None and options.get("importance") is None:
        # with calibration data a calibrated criterion is the default: weight norms know nothing of it
        options["importance"] = "activation" if calibration is not None else "l2"
    if pipeline is None and options["importance"] in MAGNITUDE and is_language_model(model):
        logger.warning("%s magnitude importance on a language model: weight norms say little about what an "
                       "LLM's units do (perplexity can explode); give calibration text and --importance "
                       "activation or obs", options["importance"])
    passes = parse_pipeline(pipeline) if pipeline is not None else build_passes(seed=seed, **options)
    inputs = PassInputs(calibration=None if calibration is None else dict(calibration),
                        labels=None if labels is None else np.asarray(labels),
                        saliency=None if saliency is None else dict(saliency), seed=seed)
    return PassManager(passes, verify=verify, seed=seed, progress=progress, inputs=inputs).run(model)


#: importance kinds that read weights only
MAGNITUDE = frozenset({"l1", "l2"})


def is_language_model(model: Model) -> bool:
    """Whether an output's last axis is a vocabulary: the rows of a table that a Gather reads with
    token ids given as a graph input (an LM head over the embedding's vocabulary)."""
    inputs = {t.name for t in model.graph.inputs}
    vocab = {node.inputs[0].values.shape[0] for node in model.graph.nodes
             if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and node.inputs[0].values.ndim == 2
             and len(node.inputs) > 1 and node.inputs[1].name in inputs}
    return any(t.shape is not None and len(t.shape) == 3 and t.shape[-1] in vocab for t in model.graph.outputs)


def _analysis_copy(model: Model) -> Model:
    work = model.copy()
    unshare_constants(work)
    work.infer_shapes()
    return work


def inspect(model: Model, gqa: str = "kv") -> Dependencies:
    """The dependency groups of `model` (after un-sharing constants, as `prune` sees them)."""
    return analyze(_analysis_copy(model), gqa)


def preview(model: Model, ratio: float | None = None, threshold: float | None = None, importance: str = "l2",
            round_to: int | None = None, seed: int = 0, prune_hidden: bool = False, gqa: str = "kv",
            ) -> tuple[Dependencies, dict[int, int]]:
    """Dry run of `prune`: the groups and how many units each would keep; `model` is not changed."""
    work = _analysis_copy(model)
    am = AnalysisManager()
    deps = am.run(make_analysis("analyze-deps", gqa=gqa), work)
    if ratio is None and threshold is None:
        return deps, {g.id: g.units for g in deps.weight_groups}
    scores = am.run(make_analysis("score-importance", kind=importance, seed=seed), work)
    plan = make_plan(deps, scores, ratio, threshold, round_to, hidden=prune_hidden)
    return deps, {g.id: len(plan.kept[g.id]) if g.id in plan.kept else g.units for g in deps.weight_groups}
