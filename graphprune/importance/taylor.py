"""First-order Taylor importance on any ONNX graph, through the torch lowering.

Removing unit u changes a loss L by about -c_u, c_u = sum over the unit's weights (in every member of
its group) of (dL/dw)·w. Two forms, averaged over calibration batches: `taylor` = mean |c_u|,
`fisher` = mean c_u^2 (the squared / empirical-Fisher form, which weighs batches where the unit
matters a lot more heavily).

The loss: with labels (an array `labels` in the calibration .npz, one per sample), the task loss on
the first output: cross-entropy for integer classes, MSE for float targets. Without labels, the
label-free default: L = r·outputs for a random direction r ~ N(0, I) (`draws` per batch). Then c_u =
r·J·w_u, the removal's output change J·w_u seen along r, and E[c_u^2] = ||J·w_u||^2: the expected
squared output change, for any output (embeddings, logits, feature maps), with no targets needed.
(The dense model's own predictions as targets would give zero gradients: the dense model is at
their minimum.) For text inputs, r is zero at padding positions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from graphprune.analysis.deps import Dependencies
from graphprune.calib import LABELS, CalibrationError, batches, dynamic_sequence, positions
from graphprune.importance.base import calibration_feeds, register_scorer, unit_rows
from graphprune.inputs import PassInputs
from graphprune.ir.model import Model
from graphprune.lazy import F, torch

if TYPE_CHECKING:
    import torch as _torch

logger = logging.getLogger(__name__)


def _direction(output: _torch.Tensor, feeds: dict[str, np.ndarray], generator: _torch.Generator) -> _torch.Tensor:
    """A random direction on the output, zero at padding positions (which no user reads)."""
    r = torch.randn(output.shape, generator=generator)
    mask = positions(feeds, output)
    if mask is not None:
        r = r * torch.from_numpy(mask.reshape(mask.shape + (1,) * (output.dim() - 2))).to(r.dtype)
    return r


def task_loss(output: _torch.Tensor, labels: _torch.Tensor) -> _torch.Tensor:
    """Cross-entropy for integer class labels (classes on the output's last axis), MSE for float targets."""
    if not labels.is_floating_point():
        if tuple(labels.shape) != tuple(output.shape[:-1]):
            raise CalibrationError(f"class labels of shape {list(labels.shape)} do not fit the first output's "
                                   f"shape {list(output.shape)} (classes on the last axis)")
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1).long(), reduction="sum")
    if tuple(labels.shape) != tuple(output.shape):
        raise CalibrationError(f"float labels of shape {list(labels.shape)} do not match the first output's "
                               f"shape {list(output.shape)}")
    return F.mse_loss(output, labels.to(output.dtype), reduction="sum")


def taylor_scores(model: Model, deps: Dependencies, feeds: dict[str, np.ndarray], draws: int = 2,
                  batch: int = 16, seed: int = 0, labels: np.ndarray | None = None,
                  squared: bool = False) -> dict[int, np.ndarray]:
    """Per prunable group, the first-order change of the loss (or, label-free, of the outputs) when a
    unit goes: the mean over batches of |c_u| (`squared`: of c_u^2, the Fisher form), where
    c_u = sum of dL/dw * w over the unit's weights. With `labels` (one per sample), L is the task
    loss on the first output; without, L = r . outputs for random directions r (`draws` per batch)."""
    from graphprune.torch.lowering import lower, parameter_names

    module = lower(model)
    params = {name: getattr(module, attr) for attr, name in parameter_names(module).items()}
    names = [t.name for t in model.graph.inputs if t.name in feeds]
    if labels is not None:
        if len(labels) != len(next(iter(feeds.values()))):
            raise CalibrationError(f"{len(labels)} labels for {len(next(iter(feeds.values())))} calibration samples")
        feeds = dict(feeds, **{LABELS: labels})
        draws = 1
    generator = torch.Generator().manual_seed(seed)
    totals = {g.id: np.zeros(g.unit_count) for g in deps.prunable}
    members = {g.id: [m for m in g.scored_weights if m.tensor in params] for g in deps.prunable}
    count = 0
    for chunk in batches(feeds, batch, trim=dynamic_sequence(model.to_onnx())):
        inputs = [torch.from_numpy(np.ascontiguousarray(chunk[name])) for name in names]
        for _ in range(draws):
            module.zero_grad(set_to_none=True)
            outputs = module(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            if labels is not None:
                loss = task_loss(outputs[0], torch.from_numpy(np.ascontiguousarray(chunk[LABELS])))
            else:
                loss = sum((_direction(o, chunk, generator) * o).sum() for o in outputs if o.is_floating_point())
            loss.backward()
            contributions = {name: (p.grad * p).detach().numpy().astype(np.float64)
                             for name, p in params.items() if p.grad is not None}
            for group_id, group_members in members.items():
                per_unit = sum((unit_rows(contributions[m.tensor], m).sum(axis=1)
                                for m in group_members if m.tensor in contributions), np.zeros(len(totals[group_id])))
                totals[group_id] += np.square(per_unit) if squared else np.abs(per_unit)
            count += 1
    return {gid: total / max(count, 1) for gid, total in totals.items()}


class Taylor:
    """taylor: mean |c_u| over calibration batches; fisher: mean c_u^2 (see the module doc)."""

    kinds: ClassVar[tuple[str, ...]] = ("taylor", "fisher")

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        feeds = calibration_feeds(model, inputs, kind)
        return taylor_scores(model, deps, dict(feeds), seed=inputs.seed, squared=kind == "fisher", labels=inputs.labels)


register_scorer(Taylor())
