"""Memory-mapped weights: big initializers stay in their files instead of being copied into memory.

A model loaded with external data keeps each initializer above MAPPED_MIN_BYTES as a read-only numpy
view of an mmap of the data file. Reading it pulls pages through the page cache; `release` drops
them from the process again, so a model larger than memory can be scored and pruned a tensor at a
time. A rewrite that replaces a mapped tensor writes the new array to a scratch file and maps that
(`replacement`), so pruned weights do not pile up in memory either. `Model.to_onnx` exports a mapped
tensor as an external-data reference to its file (`reference`, no bytes copied) and `ir.save_model`
copies those bytes file to file (`copy_bytes`).

Rewrites never mutate weight arrays in place (the IR's contract); mapped arrays are read-only, so a
breach fails loudly instead of corrupting the input's data file.
"""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

#: initializers of more bytes than this are memory-mapped. Skeletons (`ir.weightless_copy`) leave
#: out exactly these, so a mapped tensor's reference never reaches onnx.checker or shape inference.
MAPPED_MIN_BYTES = 1 << 16
#: bytes copied per step when a file-to-file copy cannot be done by the kernel
COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class Origin:
    """Where a mapped array's bytes live."""

    path: Path  # absolute
    offset: int
    length: int


# id(array) -> (weak reference to it, its mmap, where its bytes are); entries go when arrays die
_MAPPED: dict[int, tuple[weakref.ref, mmap.mmap, Origin]] = {}


def map_file(path: str | os.PathLike, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A read-only array over bytes `offset..` of `path` (little-endian, as ONNX stores them)."""
    path = Path(path).resolve()
    dtype = np.dtype(dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    length = count * dtype.itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start)
    array = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset - start).reshape(shape)
    key = id(array)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _MAPPED.get(key, (None,))[0] is ref:
            del _MAPPED[key]

    _MAPPED[key] = (weakref.ref(array, forget), mapping, Origin(path, offset, length))
    return array


def origin(array: object) -> Origin | None:
    """Where `array`'s bytes live, if it is a mapped array (not a view or copy of one)."""
    entry = _MAPPED.get(id(array))
    return entry[2] if entry is not None and entry[0]() is array else None


def release(array: object) -> None:
    """Drop the pages of a mapped array from this process (they stay in the page cache, and are
    read back on the next access). Anything else: nothing to do."""
    entry = _MAPPED.get(id(array))
    if entry is not None and entry[0]() is array:
        entry[1].madvise(mmap.MADV_DONTNEED)


def release_all() -> None:
    for ref, mapping, _ in list(_MAPPED.values()):
        if ref() is not None:
            mapping.madvise(mmap.MADV_DONTNEED)


def mapped_bytes() -> int:
    return sum(o.length for ref, _, o in _MAPPED.values() if ref() is not None)


# -- scratch files for rewritten weights ------------------------------------------------------------
_scratch: Path | None = None


def _scratch_folder() -> Path:
    """One folder per process (under TMPDIR), removed at exit."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="graphprune-weights-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def spill(array: np.ndarray) -> np.ndarray:
    """`array` written to a scratch file and mapped from there; the file goes when the mapping does."""
    array = np.ascontiguousarray(array)
    handle, name = tempfile.mkstemp(suffix=".bin", dir=_scratch_folder())
    with os.fdopen(handle, "wb") as out:
        out.write(array.astype(array.dtype.newbyteorder("<"), copy=False).data)
    mapped = map_file(name, 0, array.shape, array.dtype)
    weakref.finalize(mapped, Path(name).unlink, missing_ok=True)  # the folder may be gone first, at exit
    return mapped


def replacement(old: object, new: np.ndarray) -> np.ndarray:
    """What to store in place of `old`: `new` itself, or `new` spilled to a scratch file when `old`
    was mapped (a model streamed from disk stays on disk). `old`'s pages are released."""
    if origin(old) is None:
        return new
    release(old)
    return spill(new) if new.nbytes > MAPPED_MIN_BYTES else new


# -- ONNX references --------------------------------------------------------------------------------
def reference(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A TensorProto naming a mapped array's bytes by absolute path (valid while the array lives;
    `ir.save_model` turns it into an ordinary relative reference)."""
    where = origin(array)
    if where is None:
        raise ValueError(f"tensor '{name}' is not memory-mapped")
    tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                              dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", str(where.path)), ("offset", str(where.offset)), ("length", str(where.length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def referenced(tensor: onnx.TensorProto) -> Origin | None:
    """The bytes an external TensorProto made by `reference` points to (None for other tensors)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    path = Path(info.get("location", ""))
    if not path.is_absolute():
        return None
    return Origin(path, int(info.get("offset", 0)), int(info["length"]))


def copy_bytes(source: Origin, out: BinaryIO) -> None:
    """Append `source`'s bytes to `out`, file to file (no copy through this process's memory when
    the kernel can do it)."""
    out.flush()
    kernel_copy = getattr(os, "copy_file_range", None)
    with open(source.path, "rb") as handle:
        position, left = source.offset, source.length
        try:
            while left and kernel_copy is not None:
                done = kernel_copy(handle.fileno(), out.fileno(), left, position)
                if done <= 0:
                    break
                position, left = position + done, left - done
        except OSError:  # no kernel copy between these files: read and write below
            pass
        out.seek(0, os.SEEK_END)
        handle.seek(position)
        while left:
            chunk = handle.read(min(left, COPY_CHUNK))
            if not chunk:
                raise OSError(f"{source.path} ends before byte {source.offset + source.length}")
            out.write(chunk)
            left -= len(chunk)
