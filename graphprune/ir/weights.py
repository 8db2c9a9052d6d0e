"""Memory-mapped weights: big initializers stay in their files instead of being copied into memory.

A model loaded with external data keeps each initializer above MAPPED_MIN_BYTES as a read-only numpy
view of a mapping of the data file. Reading it pulls pages through the page cache; `release` drops
them from the process again, so a model larger than memory can be scored and pruned a tensor at a
time. A rewrite that replaces a mapped tensor writes the new array to a scratch file and maps that
(`replacement`), so pruned weights do not pile up in memory either.

`Model.to_onnx` exports a mapped tensor as a *reference*: an external-data TensorProto whose location
names the mapping (`reference`), not bytes; `Model.from_onnx` turns references back into the same
arrays (`referenced`), and `ir.save_model` writes their bytes out (`write_bytes`). A reference is
valid in this process only, while its array lives or, after that, while the file it was mapped from
is unchanged; it is never a file location that another program could read.

Mappings are made through libc (`mmap`/`munmap`/`madvise`) so they hold no file descriptor: a model
with thousands of big tensors maps as many without meeting the open-files limit. Where libc cannot
be used (Windows), `map_file` reads the bytes into memory instead. Rewrites never mutate weight
arrays in place (the IR's contract); mapped arrays are read-only, so a breach fails loudly instead of
corrupting the input's data file.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
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
#: out exactly these, so a reference never reaches onnx.checker or shape inference.
MAPPED_MIN_BYTES = 1 << 16
#: bytes written per step by `write_bytes`
WRITE_CHUNK = 1 << 24
#: the location prefix that marks a reference (no real path starts so: a file naming it is refused
#: at load as missing external data)
REFERENCE_PREFIX = "graphprune-mapped:"


def _libc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass(frozen=True)
class Origin:
    """Where a mapped array's bytes live."""

    path: Path  # absolute
    offset: int
    length: int
    stamp: tuple[int, ...]  # the file's device, inode, size and modification time when mapped


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


@dataclass(frozen=True)
class _Entry:
    array: weakref.ref
    address: int  # of the page-aligned mapping
    size: int
    origin: Origin
    serial: int  # names the array in references


# id(array) -> entry, and serial -> entry; entries go when their arrays die, leaving their origin
_BY_ID: dict[int, _Entry] = {}
_BY_SERIAL: dict[int, _Entry] = {}
_PAST: dict[int, Origin] = {}
_serials = itertools.count(1)


def _entry(array: object) -> _Entry | None:
    entry = _BY_ID.get(id(array))
    return entry if entry is not None and entry.array() is array else None


def map_file(path: str | os.PathLike, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A read-only array over bytes `offset..` of `path` (little-endian, as ONNX stores them)."""
    path = Path(path).resolve()
    dtype = np.dtype(dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    length = count * dtype.itemsize
    if _LIBC is None:
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)
        array.flags.writeable = False
        return array
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = length + offset - start
    handle = os.open(path, os.O_RDONLY)
    try:
        address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle, start)
        info = os.fstat(handle)
    finally:
        os.close(handle)  # the mapping does not need it
    if address in (None, _MAP_FAILED):
        error = ctypes.get_errno()
        raise OSError(error, f"cannot map {path}: {os.strerror(error)}")
    buffer = (ctypes.c_ubyte * size).from_address(address)
    unmap = weakref.finalize(buffer, _LIBC.munmap, address, size)  # when the last view of it goes
    unmap.atexit = False  # the OS unmaps at exit; unmapped early, a later exit handler could crash
    view = memoryview(buffer).toreadonly()  # arrays over it cannot be made writable again
    array = np.frombuffer(view, dtype=dtype, count=count, offset=offset - start).reshape(shape)
    key, serial = id(array), next(_serials)

    def forget(ref: weakref.ref) -> None:
        if _BY_ID.get(key) is entry:
            del _BY_ID[key]
        gone = _BY_SERIAL.pop(serial, None)
        if gone is not None:
            _PAST[serial] = gone.origin

    stamp = info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns
    entry = _Entry(weakref.ref(array, forget), address, size, Origin(path, offset, length, stamp), serial)
    _BY_ID[key] = _BY_SERIAL[serial] = entry
    return array


def origin(array: object) -> Origin | None:
    """Where `array`'s bytes live, if it is a mapped array (not a view or copy of one)."""
    entry = _entry(array)
    return entry.origin if entry is not None else None


def release(array: object) -> None:
    """Drop the pages of a mapped array from this process (they stay in the page cache, and are
    read back on the next access). Anything else: nothing to do."""
    entry = _entry(array)
    if entry is not None and _LIBC is not None:  # there are entries only where libc maps files
        _LIBC.madvise(entry.address, entry.size, mmap.MADV_DONTNEED)


def release_all() -> None:
    if _LIBC is None:  # nothing is mapped
        return
    for entry in list(_BY_ID.values()):
        if entry.array() is not None:
            _LIBC.madvise(entry.address, entry.size, mmap.MADV_DONTNEED)


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


# -- references in ONNX protos ----------------------------------------------------------------------
def reference(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An external-data TensorProto that names the mapped `array` instead of holding its bytes."""
    entry = _entry(array)
    if entry is None:
        raise ValueError(f"tensor '{name}' is not memory-mapped")
    data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(array.shape),
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", f"{REFERENCE_PREFIX}{entry.serial}"), ("offset", "0"),
                       ("length", str(entry.origin.length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def is_reference(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value.startswith(REFERENCE_PREFIX) for e in tensor.external_data)


def referenced(tensor: onnx.TensorProto) -> np.ndarray:
    """The array a reference names. Once that array is gone (its model was dropped, as in
    `load_model(path).to_onnx()`), its file is mapped again if it is unchanged since; a rewritten
    weight's scratch file goes with its array, so then this raises LookupError."""
    location = next(e.value for e in tensor.external_data if e.key == "location")
    serial = int(location.removeprefix(REFERENCE_PREFIX))
    entry = _BY_SERIAL.get(serial)
    array = entry.array() if entry is not None else None
    if array is not None:
        return array
    past = _PAST.get(serial)
    if past is not None and _stamp(past.path) == past.stamp:
        return map_file(past.path, past.offset, tuple(tensor.dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    raise LookupError(f"tensor '{tensor.name}' refers to memory-mapped weights that no longer exist "
                      "(a proto from Model.to_onnx() is valid while its model lives)")


def write_bytes(array: np.ndarray, out: BinaryIO) -> None:
    """Append `array`'s bytes (little-endian) to `out` a chunk at a time, then release its pages."""
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)
    for start in range(0, data.size, WRITE_CHUNK):
        out.write(data[start:start + WRITE_CHUNK].data)
    release(array)
