"""Helpers for tests and golden cases: models from ONNX text with random weights."""

from __future__ import annotations

import re

import numpy as np
import onnx

from graphprune.ir import Model

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
