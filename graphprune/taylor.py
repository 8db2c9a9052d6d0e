"""First-order Taylor importance on any ONNX graph, through the torch lowering.

Removing unit u changes the outputs by about -J·w_u (J: the outputs' Jacobian with respect to the
unit's weights, w_u: all of its weights in every member of its group). With no labels, the score is
the expected squared size of that change: for a random direction r ~ N(0, I) on the outputs,
E[(r·J·w_u)^2] = ||J·w_u||^2, and r·J·w_u = sum over the unit's weights of (dL/dw)·w for the
loss L = r·outputs. Scores average `draws` random directions per calibration batch. This needs no
targets, works for any output (embeddings, logits, feature maps), and is the label-free default.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from graphprune.calib import batches
from graphprune.deps import Dependencies
from graphprune.ir import Model
from graphprune.lowering import lower, parameter_names
from graphprune.plan import unit_rows

logger = logging.getLogger(__name__)


def taylor_scores(model: Model, deps: Dependencies, feeds: dict[str, np.ndarray], draws: int = 2,
                  batch: int = 16, seed: int = 0) -> dict[int, np.ndarray]:
    """Expected squared first-order output change of removing each unit, per prunable group."""
    module = lower(model)
    params = {name: getattr(module, attr) for attr, name in parameter_names(module).items()}
    names = [t.name for t in model.graph.inputs if t.name in feeds]
    generator = torch.Generator().manual_seed(seed)
    totals = {g.id: np.zeros(g.units) for g in deps.prunable}
    members = {g.id: [m for m in g.scored_weights if m.tensor in params] for g in deps.prunable}
    count = 0
    for chunk in batches(feeds, batch):
        inputs = [torch.from_numpy(np.ascontiguousarray(chunk[name])) for name in names]
        for _ in range(draws):
            module.zero_grad(set_to_none=True)
            outputs = module(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            loss = sum((torch.randn(o.shape, generator=generator) * o).sum() for o in outputs if o.is_floating_point())
            loss.backward()
            contributions = {name: (p.grad * p).detach().numpy().astype(np.float64)
                             for name, p in params.items() if p.grad is not None}
            for group_id, group_members in members.items():
                per_unit = sum((unit_rows(contributions[m.tensor], m).sum(axis=1)
                                for m in group_members if m.tensor in contributions), np.zeros(len(totals[group_id])))
                totals[group_id] += np.square(per_unit)
            count += 1
    return {gid: total / max(count, 1) for gid, total in totals.items()}
