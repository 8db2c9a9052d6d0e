"""Calibration data: real inputs for data-aware importance scores (and, later, reconstruction).

`--calib FILE.npz` holds one array per model input, named after it, first axis = samples;
`--calib random` draws seeded random inputs of the model's input shapes. For text models,
`text_calibration` turns lines of a text file into token inputs with the model's tokenizer.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from graphprune import runtime
from graphprune.errors import GraphpruneError
from graphprune.ir.model import first_line

#: samples drawn for `--calib random`
RANDOM_SAMPLES = 32
#: an array of this name in a calibration .npz (when no model input has the name) holds one label per
#: sample: Taylor scores then use the task loss
LABELS = "labels"


class CalibrationError(GraphpruneError):
    """Calibration data that does not fit the model (missing inputs, wrong shapes, bad file)."""


def model_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in initializers]


def load_calibration(path: Path, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays for every model input from an .npz file, checked against the input types and shapes."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"calibration file {path} is not a readable .npz archive: {first_line(exc)}") from exc
    feeds: dict[str, np.ndarray] = {}
    samples = None
    for value in model_inputs(proto):
        if value.name not in arrays:
            raise CalibrationError(f"calibration file {path} has no array '{value.name}' (it has: "
                                   f"{', '.join(sorted(arrays)) or 'nothing'})")
        array = arrays[value.name]
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if array.ndim != len(dims) or any(d is not None and a != d for a, d in zip(array.shape[1:], dims[1:],
                                                                                    strict=False)):
            raise CalibrationError(f"calibration array '{value.name}' has shape {list(array.shape)}; the model "
                                   f"wants {['?' if d is None else d for d in dims]} (first axis: samples)")
        if samples is not None and array.shape[0] != samples:
            raise CalibrationError(f"calibration arrays disagree on the number of samples ({samples} vs "
                                   f"{array.shape[0]} in '{value.name}')")
        samples = array.shape[0]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise CalibrationError(f"calibration array '{value.name}' is {array.dtype}; the model wants {dtype}")
        feeds[value.name] = array.astype(dtype, copy=False)
    if not samples:
        raise CalibrationError(f"calibration file {path} holds no samples")
    return feeds


def load_labels(path: Path, proto: onnx.ModelProto) -> np.ndarray | None:
    """The `labels` array of a calibration file (None when it has none, or when it is a model input)."""
    if any(v.name == LABELS for v in model_inputs(proto)):
        return None
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data[LABELS]) if LABELS in data.files else None


def random_calibration(proto: onnx.ModelProto, samples: int = RANDOM_SAMPLES, seed: int = 0,
                       dynamic_dim: int = runtime.DEFAULT_DYNAMIC_DIM) -> dict[str, np.ndarray]:
    """Seeded random inputs; the first axis holds `samples`, other symbolic dims `dynamic_dim`; an
    integer `attention_mask` is all ones, as in `runtime.sample_inputs`."""
    feeds = runtime.sample_inputs(proto, seed=seed, dynamic_dim=dynamic_dim)
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in feeds.items():
        shape = (samples,) + array.shape[1:] if array.ndim else (samples,)
        out[name] = runtime.random_input(rng, name, shape, array.dtype)
    return out


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local folder (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot load a tokenizer from {path}: {first_line(exc)}") from exc


def text_calibration(text_file: Path, tokenizer_path: str, input_names: list[str], seq: int = 128,
                     samples: int | None = None) -> dict[str, np.ndarray]:
    """Token inputs (`input_ids`, `attention_mask`, `token_type_ids` as the model takes them) from the
    non-empty lines of a text file, with a Hugging Face tokenizer."""
    tokenizer = load_tokenizer(tokenizer_path)
    lines = [line.strip() for line in Path(text_file).read_text().splitlines() if line.strip()]
    if samples is not None:
        lines = lines[:samples]
    if not lines:
        raise CalibrationError(f"{text_file} has no text lines")
    encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    missing = [name for name in input_names if name not in encoded]
    if missing:
        raise CalibrationError(f"the tokenizer gives {', '.join(encoded)}, not {', '.join(missing)}")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names}


#: the input that marks real (1) and padding (0) token positions of a text model
ATTENTION_MASK = "attention_mask"


class Shaped(Protocol):
    """What `positions` reads of an activation: a numpy array or a torch tensor."""

    @property
    def ndim(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def positions(feeds: dict[str, np.ndarray], value: Shaped) -> np.ndarray | None:
    """Which [sample, position] rows of an activation are real tokens: the `attention_mask` input as
    booleans when the activation starts with its [batch, sequence] shape, else None (all rows count).

    Text calibration is padded to a fixed length, so most positions are often padding; fitting or
    scoring on them would spend the calibration data on states no output uses.
    """
    mask = feeds.get(ATTENTION_MASK)
    if mask is None or mask.ndim != 2 or value.ndim < 3 or value.shape[:2] != mask.shape:
        return None
    return mask.astype(bool)


def token_rows(feeds: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """The activation as [rows, last axis], padding positions left out (see `positions`)."""
    mask = positions(feeds, value)
    return value[mask] if mask is not None else value.reshape(-1, value.shape[-1])


def dynamic_sequence(proto: onnx.ModelProto) -> bool:
    """Whether the model takes any sequence length: every [batch, sequence] input has a symbolic axis 1."""
    return sequence_is_dynamic({v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                                         for d in v.type.tensor_type.shape.dim] for v in model_inputs(proto)})


def sequence_is_dynamic(shapes: dict[str, list | tuple | None]) -> bool:
    """`dynamic_sequence` on input shapes (name -> dims, ints for static ones): there is a 2-D
    `attention_mask` and no input has a static axis 1."""
    mask = shapes.get(ATTENTION_MASK)
    if mask is None or len(mask) != 2:
        return False
    return all(dims is None or len(dims) < 2 or not isinstance(dims[1], int) for dims in shapes.values())


def trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch without trailing positions that are padding in every sample (a model with a dynamic
    sequence axis gives the same states at the real positions, for less work)."""
    mask = feeds.get(ATTENTION_MASK)
    if mask is None or mask.ndim != 2 or not mask.any():
        return feeds
    length = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
    if length == mask.shape[1]:
        return feeds
    return {name: array[:, :length] if array.ndim >= 2 and array.shape[:2] == mask.shape else array
            for name, array in feeds.items()}


def batches(feeds: Mapping[str, np.ndarray], size: int,
            trim: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive chunks of `size` samples; `trim`: without all-padding trailing positions (only for a
    model with a dynamic sequence axis, see `dynamic_sequence`)."""
    count = len(next(iter(feeds.values())))
    for start in range(0, count, size):
        chunk = {name: array[start:start + size] for name, array in feeds.items()}
        yield trim_padding(chunk) if trim else chunk
