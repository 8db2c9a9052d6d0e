"""Helpers for tests and golden cases: models from ONNX text with random weights."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx

from graphprune.analysis.deps import Dependencies, Group
from graphprune.ir.model import Model

_WEIGHTS = re.compile(r"^\s*#\s*weights:(.*)$", re.MULTILINE)


def model_from_text(text: str, seed: int = 0) -> Model:
    """Parse ONNX text; graph inputs named on a ``# weights: a b c`` line become random initializers.

    Weights are drawn from a seeded normal distribution, so golden cases need no literal values.
    """
    proto = onnx.parser.parse_model(text)
    names = {name for match in _WEIGHTS.findall(text) for name in match.split()}
    rng = np.random.default_rng(seed)
    inputs = list(proto.graph.input)
    unknown = names - {i.name for i in inputs}
    if unknown:
        raise ValueError(f"'# weights:' names {sorted(unknown)}, which are not graph inputs")
    del proto.graph.input[:]
    for value in inputs:
        if value.name not in names:
            proto.graph.input.append(value)
            continue
        ttype = value.type.tensor_type
        shape = [d.dim_value for d in ttype.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        array = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else \
            np.zeros(shape, dtype)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, value.name))
    onnx.checker.check_model(proto)
    return Model.from_onnx(proto)


def mlp(between: str = "Relu", seed: int = 0) -> Model:
    """A two-layer MLP, x[N, 8] -> 16 hidden neurons -> y[N, 4], with the node `between` (an op
    and its attributes, e.g. ``"Shrink <lambd = 0.1>"``) applied to the hidden neurons."""
    return model_from_text(f"""# weights: w1 w2
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 8] x, float[8, 16] w1, float[16, 4] w2) => (float[N, 4] y) {{
  h = MatMul (x, w1)
  a = {between} (h)
  y = MatMul (a, w2)
}}""", seed)


def kill_units(model: Model, choose_dead: Callable[[Group], set[int]], gqa: str = "kv",
               ) -> tuple[Dependencies, dict[int, set[int]]]:
    """Zero the units `choose_dead(group)` picks in every exact prunable group, in all weights that
    score them (shapes must be inferred); returns the analysis and the dead units per group."""
    from graphprune.analysis.deps import analyze

    deps = analyze(model, gqa)
    dead = {g.id: choose_dead(g) for g in deps.prunable if g.exact}
    consts = model.constants()
    for group in deps.prunable:
        for member in group.scored_weights if dead.get(group.id) else ():
            values = np.asarray(consts[member.tensor].values).copy()
            index: list = [slice(None)] * values.ndim
            index[member.axis] = member.unit_elements(np.array(sorted(dead[group.id])), group.unit_count)
            values[tuple(index)] = 0
            consts[member.tensor].values = values
    return deps, dead


def check_dead_unit_removal(model: Model, choose_dead: Callable[[Group], set[int]], seed: int = 2,
                            gqa: str = "kv") -> int:
    """The dead-unit oracle: zero the units `choose_dead(group)` picks in every exact prunable group
    (in all weights that score them), prune with `threshold=0` and assert that exactly those units
    left every member and the ORT outputs did not change. Returns the parameters removed.

    Runs on an un-shared copy of the constants and without cleanup (which would merge copies that
    stay equal), so the parameter count is exact.
    """
    from graphprune import api, runtime
    from graphprune.ir.model import unshare_constants
    from graphprune.pipeline import LOSSLESS_TOLERANCE

    unshare_constants(model)
    model.infer_shapes()
    deps, dead = kill_units(model, choose_dead, gqa)
    expected = 0
    for tensor in model.weights():
        kept = [sum(seg.length - len(dead.get(seg.group, ())) * seg.unit_len * seg.repeat_count
                    for seg in deps.segments[(tensor.name, axis)])
                if (tensor.name, axis) in deps.segments else size for axis, size in enumerate(tensor.values.shape)]
        expected += int(np.prod(kept))
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto, seed=seed)
    before = runtime.run(proto, feeds)
    report = api.prune(model, f"deps{{gqa={gqa}}},importance,prune{{threshold=0}},verify")
    for name, axes in report.state.items():  # a KV cache that lost heads: feeds and outputs lose them too
        names = [t.name for t in model.graph.outputs]
        for axis, indices in axes.items():
            if name in feeds:
                feeds[name] = np.take(feeds[name], indices, axis=axis)
            if name in names:
                before[names.index(name)] = np.take(before[names.index(name)], indices, axis=axis)
    after = runtime.run(model.to_onnx(), feeds)
    assert report.verified, "pruned model does not verify"
    assert report.params_after == expected, f"params {report.params_after} != expected {expected}"
    assert [a.shape for a in after] == [b.shape for b in before]
    diff = runtime.max_relative_diff(before, after)
    assert diff <= LOSSLESS_TOLERANCE, f"outputs changed by {diff:.3g} (relative)"
    return report.params_before - report.params_after


def check_lowering(model: Model, dynamic_dim: int = 3, seed: int = 1, tolerance: float = 1e-4,
                   feeds: dict[str, np.ndarray] | None = None) -> float:
    """The lowered fx module computes what ONNX Runtime computes (every output within `tolerance`
    of the largest reference value) on `feeds` or seeded sample inputs; returns the relative
    difference."""
    import torch

    from graphprune import runtime
    from graphprune.torch.lowering import lower

    proto = model.to_onnx()
    feeds = feeds or runtime.sample_inputs(proto, dynamic_dim=dynamic_dim, seed=seed)
    reference = runtime.run(proto, feeds)
    module = lower(model)
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(feeds[t.name]) for t in model.graph.inputs if t.name in feeds])
    outputs = [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    diff = runtime.max_relative_diff(reference, outputs)
    assert diff <= tolerance, f"lowered module differs from ONNX Runtime by {diff:.3g} (relative)"
    return diff


def check_png(path, min_height: int = 300, min_width: int = 500) -> None:
    """A chart was drawn: the PNG opens, is at least this many pixels and is not a blank canvas."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[0] >= min_height and image.shape[1] >= min_width, image.shape
    assert float(np.std(image[..., :3])) > 0.05, "the image is blank"
