"""ONNX Runtime as the reference executor: sample inputs, sessions, verification."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import VerificationError
from graphprune.ir.model import (
    EXTERNAL_DATA_THRESHOLD,
    ORT_DEFAULT_DOMAIN_OPS,
    check_model,
    first_line,
    has_references,
    proto_bytes,
    save_model,
    weightless_copy,
)

logger = logging.getLogger(__name__)

# ORT prints its own errors to stderr; graphprune reports them as one line of its own instead
ort.set_default_logger_severity(3)

#: size used for symbolic (dynamic) input dims when making sample inputs
DEFAULT_DYNAMIC_DIM = 2
#: sample inputs larger than this (elements per input) are refused rather than allocated
MAX_SAMPLE_ELEMENTS = 1 << 28


def sample_inputs(proto: onnx.ModelProto, seed: int = 0, dynamic_dim: int = DEFAULT_DYNAMIC_DIM,
                  ) -> dict[str, np.ndarray]:
    """Random inputs matching the graph inputs (symbolic dims become `dynamic_dim`, or what the graph
    implies for them: `implied_dims`); an integer `attention_mask` is all ones."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in proto.graph.initializer}
    implied = implied_dims(proto)
    feeds: dict[str, np.ndarray] = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else _dim_size(d.dim_param, implied, dynamic_dim)
                 for d in ttype.shape.dim]
        if np.prod(shape, dtype=np.float64) > MAX_SAMPLE_ELEMENTS:
            raise VerificationError(f"input '{value.name}' declares shape {shape}: {np.prod(shape, dtype=np.float64):.3g} "
                                    f"elements, too many to run a check with (limit {MAX_SAMPLE_ELEMENTS:,})")
        feeds[value.name] = random_input(rng, value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    return feeds


def _dim_size(param: str, implied: dict[str, int], dynamic_dim: int) -> int:
    """A symbolic dim's sample size: implied, or `dynamic_dim`; a sum such as Optimum's
    `past_sequence_length + sequence_length` (an attention mask over cache and prompt) adds its terms."""
    if param in implied or "+" not in param:
        return implied.get(param, dynamic_dim)
    terms = [term.strip() for term in param.split("+")]
    return sum(int(term) if term.isdigit() else implied.get(term, dynamic_dim) for term in terms)


def random_input(rng: np.random.Generator, name: str, shape, dtype) -> np.ndarray:
    """A random array for the input `name`; an integer `attention_mask` is all ones (every token
    attends: a random 0/1 mask can leave a row with nothing to attend to)."""
    if name == "attention_mask" and np.issubdtype(dtype, np.integer):
        return np.ones(shape, dtype)
    return random_array(rng, shape, dtype)


def implied_dims(proto: onnx.ModelProto) -> dict[str, int]:
    """Symbolic dims of graph inputs that the graph fixes: the head size of a KV cache fed to a
    com.microsoft GroupQueryAttention or MultiHeadAttention (the onnxruntime-genai builder
    declares it as `kv_cache_dim`), from the query width and the head-count attributes."""
    widths = {v.name: v.type.tensor_type.shape.dim for v in [*proto.graph.value_info, *proto.graph.input]}
    inputs = {v.name: v.type.tensor_type.shape.dim for v in proto.graph.input}
    implied: dict[str, int] = {}
    for node in proto.graph.node:
        if node.domain != "com.microsoft" or node.op_type not in ("GroupQueryAttention", "MultiHeadAttention"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        query = widths.get(node.input[0])
        if query is None or len(query) != 3 or not query[2].HasField("dim_value") or not attrs.get("num_heads"):
            continue
        packed = len(node.input) < 2 or not node.input[1]
        heads = attrs["num_heads"] + (2 * attrs.get("kv_num_heads", attrs["num_heads"]) if packed else 0)
        caches = node.input[3:5] if node.op_type == "GroupQueryAttention" else node.input[6:8]
        for name in caches:
            dims = inputs.get(name)
            if dims is not None and len(dims) == 4 and dims[3].dim_param:
                implied[dims[3].dim_param] = query[2].dim_value // heads
            if dims is not None and len(dims) == 4 and dims[2].dim_param and node.op_type == "GroupQueryAttention":
                # a prompt: the past is empty and the attention mask covers the new tokens only
                implied[dims[2].dim_param] = 0
    for value in proto.graph.input:  # a cache fed to plain ops (Optimum's Concat): a prompt too
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith("past_key_values") and len(dims) == 4 and dims[2].dim_param:
            implied.setdefault(dims[2].dim_param, 0)
    return implied


def random_array(rng: np.random.Generator, shape, dtype: np.dtype) -> np.ndarray:
    """Standard normal floats, fair booleans, integers 0 or 1 (valid token ids and indices)."""
    if np.issubdtype(dtype, np.floating):
        values = rng.standard_normal(shape)
    elif dtype == np.bool_:
        values = rng.random(shape) < 0.5
    else:
        values = rng.integers(0, 2, size=shape)
    return np.asarray(values, dtype=dtype)  # rank 0 draws are scalars, ORT wants arrays


def session(proto: onnx.ModelProto, threads: int = 1, providers: list[str] | None = None,
            ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle ORT worker threads spin by default; with several sessions alive (side-by-side benchmarks)
    # the spinning threads of one session steal the cores of the one being timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or ["CPUExecutionProvider"]
    # Memory-mapped weights go to ORT through a temporary copy on disk. Handing it the arrays in
    # place (SessionOptions.add_external_initializers) doubled the peak memory of a 1B model: ORT
    # still copies and prepacks them, and the mapped pages it read count as well.
    if proto_bytes(proto) <= EXTERNAL_DATA_THRESHOLD and not has_references(proto):
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="graphprune-ort-") as folder:
        path = save_model(proto, Path(folder) / "model.onnx", external=True)
        return ort.InferenceSession(str(path), options, providers=providers)


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(proto).run(None, feeds)


def with_outputs(proto: onnx.ModelProto, dtypes: dict[str, np.dtype]) -> onnx.ModelProto:
    """A copy of `proto` that also returns the named intermediate tensors (of the given dtypes)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(proto)
    present = {o.name for o in extended.graph.output}
    extended.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
        for name, dtype in dtypes.items() if name not in present)
    return extended


def with_weight_inputs(proto: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `proto` where the named initializers are graph inputs instead (fed at run time)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    kept = [t for t in changed.graph.initializer if t.name not in names]
    moved = [t for t in changed.graph.initializer if t.name in names]
    del changed.graph.initializer[:]
    changed.graph.initializer.extend(kept)
    changed.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    return changed


@dataclass(frozen=True)
class Verification:
    output_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float | None  # against the reference outputs, when given

    @property
    def stats(self) -> dict[str, object]:
        return {"output_shapes": [list(s) for s in self.output_shapes], "max_output_diff": self.max_abs_diff}


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def max_relative_diff(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Largest |a - b| relative to the reference's magnitude max |a| (per output)."""
    worst = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        if ref.size == 0:
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        scale = max(1e-12, float(np.max(np.abs(ref64))))
        worst = max(worst, float(np.max(np.abs(ref64 - out64))) / scale)
    return worst


def verify(proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
           expected_shapes: tuple[tuple[int, ...], ...] | None = None,
           reference: list[np.ndarray] | None = None, tolerance: float | None = None,
           ) -> tuple[Verification, list[np.ndarray]]:
    """onnx.checker, shape inference, an ORT run; shapes and (optionally) values against a reference."""
    try:
        check_model(proto)
        onnx.shape_inference.infer_shapes(weightless_copy(proto), strict_mode=ORT_DEFAULT_DOMAIN_OPS.isdisjoint(
            n.op_type for n in proto.graph.node))
    except Exception as exc:
        raise VerificationError(f"ONNX checker/shape inference failed: {first_line(exc)}") from exc
    try:
        outputs = run(proto, feeds)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime could not run the model: {first_line(exc)}") from exc
    shapes = tuple(tuple(o.shape) for o in outputs)
    if expected_shapes is not None and shapes != expected_shapes:
        raise VerificationError(f"output shapes changed from {list(expected_shapes)} to {list(shapes)}")
    if reference is not None:
        for index, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
            if _is_float(ref) and np.all(np.isfinite(ref)) and not np.all(np.isfinite(out)):
                raise VerificationError(f"output {index} has NaN or infinite values where the reference has none")
    diff = None
    if reference is not None:
        diff = max_relative_diff(reference, outputs)
        if tolerance is not None and not diff <= tolerance:
            raise VerificationError(f"outputs changed by {diff:.3g} (relative), more than {tolerance:g} allowed "
                                    "for a lossless pass")
    return Verification(shapes, diff), outputs
