"""The one IR: an ONNX model edited through onnx-graphsurgeon, with safe loading and atomic saving."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphprune.errors import InvalidGraphError, ModelLoadError, OutputError
from graphprune.ir import weights

logger = logging.getLogger(__name__)

#: protobuf cannot serialize a message of 2 GiB or more; above this many initializer bytes we
#: save weights as external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: external-data tensors start at multiples of this in files graphprune writes (page-aligned, so
#: ONNX Runtime and graphprune map them without an offset)
EXTERNAL_ALIGNMENT = 4096


@dataclass
class Model:
    """An ONNX model held as an onnx-graphsurgeon graph plus the model-level fields gs drops."""

    graph: gs.Graph
    ir_version: int = onnx.IR_VERSION
    producer_name: str = "graphprune"
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    external_data: bool = False  # loaded from a file with external data: saved the same way

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, source: Path | None = None) -> Model:
        """The model of `proto`; its references to memory-mapped weights (`weights.reference`, as
        made by `load_model` and `to_onnx`) become those arrays again."""
        graph = gs.import_onnx(proto)
        for const in _constants_everywhere(graph):
            lazy = const._values
            if isinstance(lazy, gs.ir.tensor.LazyValues) and weights.is_reference(lazy.tensor):
                const.values = weights.referenced(lazy.tensor)
                const.data_location = None  # it is an in-process array now, whatever gs read
        model = cls(
            graph=graph,
            ir_version=proto.ir_version,
            producer_name=proto.producer_name or "graphprune",
            metadata={p.key: p.value for p in proto.metadata_props},
            source=source,
        )
        model.fold_constant_nodes()
        return model

    def to_onnx(self) -> onnx.ModelProto:
        """The model as ONNX. Memory-mapped weights of the main graph become references (see
        graphprune.ir.weights), so even a model bigger than memory exports without copying them; such
        a proto is for this process: `save_model` and `runtime.session` write their bytes out,
        while onnx's own checker and loaders do not know them."""
        self.graph.toposort()
        # onnx-graphsurgeon exports a LazyValues tensor's proto as it is, without reading its data
        mapped = [(c, c._values) for c in self.constants().values() if weights.origin(c._values) is not None]
        for const, values in mapped:
            const._values = gs.ir.tensor.LazyValues(weights.reference(const.name, values))
        try:
            proto = gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for const, values in mapped:
                const._values = values
        # IR < 4 lists initializers among graph inputs, which onnx-graphsurgeon does not keep
        proto.ir_version = max(self.ir_version, 4)
        proto.producer_name = self.producer_name
        for key, value in self.metadata.items():
            proto.metadata_props.add(key=key, value=value)
        return proto

    def skeleton(self) -> onnx.ModelProto:
        """`weightless_copy(self.to_onnx())` without exporting the big weights first: each is
        exported as a bytes-free stub, then declared a graph input of its type and shape."""
        big = [c for c in self.constants().values()
               if int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize > weights.MAPPED_MIN_BYTES]
        held = [(const, const._values) for const in big]
        for const in big:
            data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(const.dtype))
            stub = onnx.TensorProto(name=const.name, data_type=data_type, dims=list(const.shape),
                                    data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value="graphprune-skeleton")
            const._values = gs.ir.tensor.LazyValues(stub)
        try:
            return weightless_copy(self.to_onnx())
        finally:
            for const, values in held:
                const._values = values

    def copy(self) -> Model:
        """A structural copy; weight arrays are shared, so edits must assign new arrays, never mutate."""
        return Model(self.graph.copy(), self.ir_version, self.producer_name, dict(self.metadata), self.source,
                     self.external_data)

    # -- views ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def constants(self) -> dict[str, gs.Constant]:
        return {name: t for name, t in self.graph.tensors().items() if isinstance(t, gs.Constant)}

    def weights(self) -> Iterator[gs.Constant]:
        """Float initializers: what counts as parameters."""
        for tensor in self.constants().values():
            if np.issubdtype(tensor.values.dtype, np.floating):
                yield tensor

    def param_count(self) -> int:
        return int(sum(t.values.size for t in self.weights()))

    def weight_bytes(self) -> int:
        return int(sum(t.values.nbytes for t in self.constants().values()))

    # -- normalisation ------------------------------------------------------------------------
    def fold_constant_nodes(self) -> int:
        """Turn `Constant` nodes into initializers so every constant is a gs.Constant."""
        folded = 0
        for node in list(self.graph.nodes):
            if node.op != "Constant" or "value" not in node.attrs:
                continue
            out = node.outputs[0]
            values = node.attrs["value"]
            array = values.values if isinstance(values, gs.Constant) else np.asarray(values)
            const = gs.Constant(out.name, np.asarray(array))
            for consumer in list(out.outputs):
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is out:
                        consumer.inputs[index] = const
            self.graph.outputs = [const if t is out else t for t in self.graph.outputs]
            node.outputs.clear()
            folded += 1
        if folded:
            self.graph.cleanup(remove_unused_graph_inputs=False)
        return folded

    def infer_shapes(self) -> None:
        """Clear and re-infer every intermediate shape (gs never does it by itself).

        Graph inputs and outputs keep their declared shapes: pruning never changes them, and ONNX
        inference cannot always re-derive an output's shape that the file declares. Where ONNX's
        inference gives up on a shape-preserving op (GroupNormalization in onnx 1.23), the input's
        shape is carried over and inference runs again from there.
        """
        graph_io = {t.name for t in self.graph.inputs} | {t.name for t in self.graph.outputs}
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in graph_io:
                tensor.shape = None
        for _ in range(8):
            self._infer_once(graph_io)
            carried = self._carry_preserved_shapes()
            if not self._resolve_computed_shapes() and not carried:
                break

    def _infer_once(self, graph_io: set[str]) -> None:
        skeleton = self.skeleton()
        inferred = _symbolic_inference(skeleton)
        if inferred is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
            except Exception as exc:  # onnx raises several unrelated types here
                raise InvalidGraphError(f"shape inference failed: {first_line(exc)}") from exc
        tensors = self.graph.tensors()
        infos = list(inferred.graph.value_info) + list(inferred.graph.output)
        for info in infos:
            tensor = tensors.get(info.name)
            if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
                continue
            ttype = info.type.tensor_type
            if ttype.HasField("shape") and not (tensor.name in graph_io and tensor.shape is not None):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in ttype.shape.dim]
            if ttype.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)

    def _resolve_computed_shapes(self) -> bool:
        """Reshape/Expand outputs whose target is computed at run time (Shape -> Concat chains):
        ONNX leaves them unknown; `shapes.resolve_*` solves them from the chain."""
        from graphprune.analysis.shapes import is_unknown, resolve_expand, resolve_reshape, shape_value

        tensors = self.graph.tensors()
        changed = False
        for node in self.graph.nodes:
            if node.op not in ("Reshape", "Expand") or len(node.inputs) < 2 or not is_unknown(node.outputs[0].shape):
                continue
            entries = shape_value(node.inputs[1])
            if entries is None:
                continue
            x = node.inputs[0]
            shape = (resolve_reshape(x.shape, entries, tensors, node.attrs.get("allowzero", 0))
                     if node.op == "Reshape" else resolve_expand(x.shape, entries, tensors))
            y = node.outputs[0]
            if shape is not None and None not in shape and shape != y.shape:
                y.shape, y.dtype = shape, x.dtype
                changed = True
        return changed

    def _carry_preserved_shapes(self) -> bool:
        carried = False
        for node in self.graph.nodes:
            if node.op not in SHAPE_PRESERVING_OPS or not node.outputs or not node.inputs:
                continue
            x, y = node.inputs[0], node.outputs[0]
            if y.shape is None and getattr(x, "shape", None) is not None:
                y.shape, y.dtype = list(x.shape), x.dtype
                carried = True
        return carried


@contextlib.contextmanager
def _working_directory(folder: str) -> Iterator[None]:
    """contextlib.chdir (Python 3.11+) for 3.10 too. The working directory is the whole process's:
    threads that use relative paths meanwhile would see `folder`."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


#: ONNX ops (opset 23) that share their name with a com.microsoft op ONNX Runtime's symbolic
#: inference knows: it would read them with the contrib op's inputs and give up
ONNX_NAMESAKES = frozenset({"Attention", "RotaryEmbedding"})


def _ort_symbolic_shape_infer() -> types.ModuleType:
    """onnxruntime.tools.symbolic_shape_infer, loaded without running onnxruntime/tools/__init__.py:
    that imports torch whenever it is installed (for export helpers graphprune does not use), and
    pruning an ONNX file should not pay for torch."""
    name = "onnxruntime.tools.symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        spec = importlib.util.spec_from_file_location(
            name, Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name} from {Path(onnxruntime.__file__).parent}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _symbolic_inference(skeleton: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference: it follows Shape -> Gather -> Concat chains and
    keeps dims symbolic (`batch*seq`) where ONNX's own inference gives up. None when it cannot
    handle the graph (unknown ops, custom domains): ONNX's inference is the fallback."""
    ort_symbolic = _ort_symbolic_shape_infer()
    base: type = ort_symbolic.SymbolicShapeInference  # loaded from a file: a class known at run time only

    class Inference(base):
        """Default-domain namesakes of contrib ops get ONNX's inference of that one node."""

        tmp_mp_: onnx.ModelProto  # the base's scratch model for single-node inference

        def __init__(self, *args) -> None:
            super().__init__(*args)
            for op in ONNX_NAMESAKES:
                contrib = self.dispatcher_.get(op)
                if contrib is not None:
                    self.dispatcher_[op] = lambda node, contrib=contrib: (
                        None if node.domain in ("", "ai.onnx") else contrib(node))

        def _onnx_infer_single_node(self, node) -> None:
            if node.op_type not in ONNX_NAMESAKES or node.domain not in ("", "ai.onnx"):
                return super()._onnx_infer_single_node(node)
            self.tmp_mp_.graph.CopyFrom(onnx.helper.make_graph(
                [node], "tmp", [self.known_vi_[i] for i in node.input if i],
                [ort_symbolic.make_named_value_info(o) for o in node.output]))
            self.tmp_mp_ = onnx.shape_inference.infer_shapes(self.tmp_mp_)
            for index, name in enumerate(node.output):
                if name:
                    info = self.out_mp_.graph.value_info.add()
                    info.CopyFrom(self.tmp_mp_.graph.output[index])
                    self.known_vi_[name] = info

    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        # where it cannot finish, it saves its partial model as sym_shape_infer_temp.onnx in the
        # working directory: that must not land in the user's folder
        with tempfile.TemporaryDirectory(prefix="graphprune-shapes-") as folder, _working_directory(folder):
            inference = Inference(2**31 - 1, True, False, 0)
            inference._preprocess(skeleton)
            complete = False
            while inference.run_:
                complete = inference._infer_impl()
            inference._update_output_from_vi()
            return inference.out_mp_ if complete else None
    except Exception:  # it raises bare Exceptions and assertion errors on graphs it does not know
        return None
    finally:
        quiet.setLevel(level)


#: ops whose first output has the first input's shape and type (fallback when ONNX cannot infer)
SHAPE_PRESERVING_OPS = frozenset({"GroupNormalization", "InstanceNormalization", "LayerNormalization",
                                  "BatchNormalization", "Relu", "Sigmoid", "Tanh", "Gelu", "Identity"})


def _constants_everywhere(graph: gs.Graph) -> Iterator[gs.Constant]:
    """The constants of `graph` and of every subgraph (If/Loop/Scan bodies), each once."""
    seen: set[int] = set()
    stack = [graph]
    while stack:
        current = stack.pop()
        for tensor in current.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor
        stack.extend(attr for node in current.nodes for attr in node.attrs.values() if isinstance(attr, gs.Graph))


def shape_of(tensor: gs.Tensor) -> list | None:
    """Static shape of a constant, or the (inferred, possibly symbolic) shape of a variable."""
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    return None if tensor.shape is None else list(tensor.shape)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def weightless_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose big weights (over weights.MAPPED_MIN_BYTES: exactly those that can be
    memory-mapped, so no reference reaches the checker) are graph inputs of the same type and shape.

    onnx.checker and shape inference need only their dims (small constants, such as Reshape
    shapes, keep their values for data propagation), and the copy stays far below protobuf's
    2 GiB limit whatever the model's size.
    """
    skeleton = onnx.ModelProto()
    if proto_bytes(proto) <= weights.MAPPED_MIN_BYTES:
        skeleton.CopyFrom(proto)
    else:
        _copy_without_weights(proto, skeleton)
    _drop_subgraph_references(skeleton.graph)
    big = [t for t in skeleton.graph.initializer if _tensor_bytes(t) > weights.MAPPED_MIN_BYTES]
    if not big:
        return skeleton
    keep = [t for t in skeleton.graph.initializer if _tensor_bytes(t) <= weights.MAPPED_MIN_BYTES]
    inputs = {i.name for i in skeleton.graph.input}
    for tensor in big:
        if tensor.name not in inputs:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(keep)
    return skeleton


def _drop_subgraph_references(graph: onnx.GraphProto) -> None:
    """Remove memory-mapped references from subgraph initializers. onnx-graphsurgeon copies an outer
    constant that a subgraph also reads into the subgraph's initializers; without the copy the
    subgraph reads the outer one (in a skeleton: the graph input that stands for it)."""
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                kept = [t for t in subgraph.initializer if not weights.is_reference(t)]
                if len(kept) < len(subgraph.initializer):
                    del subgraph.initializer[:]
                    subgraph.initializer.extend(kept)
                _drop_subgraph_references(subgraph)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def proto_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of initializer data (ByteSize() itself fails above 2 GiB)."""
    return sum(_tensor_bytes(t) for t in proto.graph.initializer)


def _copy_without_weights(proto: onnx.ModelProto, into: onnx.ModelProto) -> None:
    """Copy everything but big initializers' bytes, never serializing the whole proto."""
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(into, name, getattr(proto, name))
    into.opset_import.extend(proto.opset_import)
    into.metadata_props.extend(proto.metadata_props)
    into.functions.extend(proto.functions)
    graph = into.graph
    graph.name = proto.graph.name
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field_name).extend(getattr(proto.graph, field_name))
    for tensor in proto.graph.initializer:
        if _tensor_bytes(tensor) <= weights.MAPPED_MIN_BYTES:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


# -- loading --------------------------------------------------------------------------------------
#: the oldest default-domain opset the rules and the lowering are written and tested for (Slice,
#: Clip, Pad and Resize changed their inputs up to opset 11; attribute forms of later changes, such
#: as Split/Squeeze/Reduce* axes before 13 and Softmax's coerced axis before 13, are handled);
#: older models are converted on request (`upgrade_opset`)
MIN_OPSET = 11
#: what `upgrade_opset` converts to
UPGRADE_OPSET = 17


def check_supported(model: Model) -> None:
    """Refuse, with the remedy, what graphprune cannot prune safely: default-domain opsets older than
    MIN_OPSET, and weights holding NaN or infinite values (no score or output check means anything).
    A one-element constant may be infinite: exporters fill masked attention scores with -inf."""
    opset = model.graph.opset
    if opset is not None and opset < MIN_OPSET:
        raise InvalidGraphError(f"the model uses ONNX opset {opset}; graphprune supports opset {MIN_OPSET} and newer: "
                                f"rerun with --upgrade-opset (converts it to opset {UPGRADE_OPSET} with "
                                "onnx.version_converter) or convert it yourself")
    for const in model.constants().values():
        values = const.values
        finite = not np.issubdtype(values.dtype, np.floating) or bool(np.all(np.isfinite(values))) or (
            values.size == 1 and not np.isnan(values).any())
        weights.release(values)
        if not finite:
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            raise InvalidGraphError(f"initializer '{const.name}' holds {nan} NaN and {inf} infinite values: "
                                    "no importance score or output check would mean anything; fix the weights first")


def upgrade_opset(model: Model, target: int = UPGRADE_OPSET) -> Model:
    """The model converted to default-domain opset `target` by onnx.version_converter."""
    try:
        converted = onnx.version_converter.convert_version(model.to_onnx(), target)
    except Exception as exc:  # the converter raises several unrelated types
        raise InvalidGraphError(f"cannot convert the model from opset {model.graph.opset} to {target}: "
                                f"{first_line(exc)}") from exc
    upgraded = Model.from_onnx(converted, model.source)
    upgraded.external_data = model.external_data
    return upgraded


def load_model(path: str | os.PathLike) -> Model:
    """Load and validate an ONNX file; every problem becomes a one-line ModelLoadError."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    data = path.read_bytes()
    if not data:
        raise ModelLoadError(f"{path}: file is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: {first_line(exc)})") from exc
    del data
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.output:
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph, IR version or graph outputs; "
                             "is the file truncated or of another format?)")
    _check_external_data(proto, path)
    _check_initializer_sizes(proto, path)
    external = any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(proto))
    try:
        mapped = _read_external_data(proto, path.parent)
    except Exception as exc:
        raise ModelLoadError(f"{path}: could not read external data: {first_line(exc)}") from exc
    check_graph(proto, where=str(path))
    model = Model.from_onnx(proto, source=path)
    model.external_data = external
    del mapped  # the model holds them now
    return model


def _read_external_data(proto: onnx.ModelProto, folder: Path) -> list[np.ndarray]:
    """Map the main graph's big external initializers of numpy types (in `proto` they become
    references that `Model.from_onnx` resolves; the arrays are returned, to be held until then) and
    read every other external tensor into `proto` (subgraphs' own initializers included: skeletons
    for the checker keep those, so they must hold their bytes)."""
    mapped = []
    for tensor in proto.graph.initializer:
        if not external_data_helper.uses_external_data(tensor) or _tensor_bytes(tensor) <= weights.MAPPED_MIN_BYTES:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        # types numpy holds as themselves (not bfloat16/float8 or, in older onnx, their uint stand-ins)
        if dtype.kind in "biuf" and onnx.helper.np_dtype_to_tensor_dtype(dtype) == tensor.data_type:
            info = {entry.key: entry.value for entry in tensor.external_data}
            mapped.append(weights.map_file(folder / info["location"], int(info.get("offset", 0)),
                                           tuple(tensor.dims), dtype))
            tensor.CopyFrom(weights.reference(tensor.name, mapped[-1]))
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor) and not weights.is_reference(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return mapped


def _declared(tensor: onnx.TensorProto) -> tuple[int, np.dtype | None]:
    """Elements a tensor's dims declare, and its numpy type where sizes can be checked (None for
    strings and the packed and ml_dtypes types)."""
    count = int(np.prod(tensor.dims, dtype=np.float64)) if tensor.dims else 1
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        return count, None
    return count, (dtype if dtype.kind in "biufc" else None)


def _check_initializer_sizes(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse initializers whose data does not fill the shape they declare (a truncated or edited
    file): found here, the problem is named instead of failing inside numpy."""
    for tensor in external_data_helper._get_initializer_tensors(proto):
        count, dtype = _declared(tensor)
        if dtype is None or external_data_helper.uses_external_data(tensor):
            continue
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data) // dtype.itemsize
        else:
            held = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))
            held //= 2 if dtype.kind == "c" else 1  # complex values are stored as pairs
        if held != count:
            raise ModelLoadError(f"{path}: initializer '{tensor.name}' declares shape {list(tensor.dims)} "
                                 f"({count:,} values) but holds {held:,}")


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor '{tensor.name}'"
        if not location:
            raise ModelLoadError(f"{where} is marked external but names no data file")
        if os.path.isabs(location):
            raise ModelLoadError(f"{where}: external data path '{location}' is absolute; "
                                 "only files inside the model's folder are read")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise ModelLoadError(f"{where}: external data '{location}' points outside the model's folder")
        if not target.is_file():
            raise ModelLoadError(f"{where}: external data file '{location}' is missing "
                                 f"(expected next to the model in {folder})")
        try:
            offset = int(info.get("offset", 0))
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            length = int(info.get("length", int(np.prod(tensor.dims, dtype=np.int64)) * itemsize))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{where}: malformed external data entry (offset/length/data type): "
                                 f"{first_line(exc)}") from exc
        count, dtype = _declared(tensor)
        if dtype is not None and length != count * dtype.itemsize:
            raise ModelLoadError(f"{where}: declares shape {list(tensor.dims)} ({count * dtype.itemsize:,} bytes) "
                                 f"but {length:,} bytes of external data")
        size = target.stat().st_size
        if offset + length > size:
            raise ModelLoadError(f"{where}: external data '{location}' is too short "
                                 f"(needs bytes {offset}..{offset + length}, file has {size})")


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model: the .onnx file and the external data files it names."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file())


def model_files(path: str | os.PathLike) -> set[Path]:
    """The model file and every external data file it names (resolved), as far as readable."""
    path = Path(path)
    files = {path.resolve()}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: only the file itself is known
        return files
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.add((path.parent / location).resolve())
    return files


#: ops ONNX Runtime registers in the default ONNX domain although ONNX has none of that name: the
#: onnxruntime-genai model builder writes them, and onnx.checker would refuse the model
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
_ORT_DOMAIN = "ai.onnxruntime.default_domain"


def check_model(proto: onnx.ModelProto) -> None:
    """onnx.checker on a weightless copy, with ORT's default-domain ops (ORT_DEFAULT_DOMAIN_OPS)
    moved to a domain of their own, which the checker leaves to the runtime as it does com.microsoft."""
    skeleton = weightless_copy(proto)
    ort_nodes = [n for n in skeleton.graph.node if n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx")]
    if ort_nodes:
        for node in ort_nodes:
            node.domain = _ORT_DOMAIN
        skeleton.opset_import.append(onnx.helper.make_opsetid(_ORT_DOMAIN, 1))
    onnx.checker.check_model(skeleton)


def check_graph(proto: onnx.ModelProto, where: str = "model") -> None:
    """Refuse graphs that read undefined tensors, then run onnx.checker."""
    graph = proto.graph
    defined = {t.name for t in graph.initializer} | {t.name for t in graph.input} | {""}
    for node in graph.node:
        for name in node.input:
            if name not in defined:
                raise InvalidGraphError(
                    f"{where}: node '{node.name or node.op_type}' ({node.op_type}) reads tensor '{name}', "
                    "which no earlier node, initializer or graph input defines")
        defined.update(node.output)
    for output in graph.output:
        if output.name not in defined:
            raise InvalidGraphError(f"{where}: graph output '{output.name}' is never produced")
    try:
        check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise InvalidGraphError(f"{where}: ONNX checker rejected the model: {first_line(exc)}") from exc


# -- saving ---------------------------------------------------------------------------------------
def _inline_small_integers(proto: onnx.ModelProto, limit: int = 1 << 16) -> None:
    """Store small int32/int64 initializers in their typed fields rather than raw bytes: onnx's
    external-data conversion only moves raw bytes, so these stay in the model file."""
    fields = {onnx.TensorProto.INT64: ("int64_data", np.int64), onnx.TensorProto.INT32: ("int32_data", np.int32)}
    for tensor in proto.graph.initializer:
        if tensor.data_type in fields and tensor.HasField("raw_data") and len(tensor.raw_data) <= limit:
            name, dtype = fields[tensor.data_type]
            values = np.frombuffer(tensor.raw_data, dtype=np.dtype(dtype).newbyteorder("<"))
            tensor.ClearField("raw_data")
            getattr(tensor, name).extend(int(v) for v in values)


def save_model(model: Model | onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> Path:
    """Write atomically: everything goes to a temporary folder beside `path`, then is renamed in.

    Weights go to `<name>.data` beside the model when asked (`external=True`), when the model was
    loaded from a file with external data, and whatever is asked when they exceed
    EXTERNAL_DATA_THRESHOLD (protobuf cannot hold 2 GiB) or some are memory-mapped.
    """
    path = Path(path)
    proto = model.to_onnx() if isinstance(model, Model) else clone_proto(model)
    # asked for explicitly, every float tensor goes out; chosen for size, small ones stay inline.
    # Small integer tensors (shapes, axes) always stay: ONNX Runtime's shape inference reads them and
    # does not follow external data.
    inline_up_to = 0 if external else 1024
    external = (bool(external) or proto_bytes(proto) > EXTERNAL_DATA_THRESHOLD or has_references(proto)
                or (isinstance(model, Model) and model.external_data))
    _inline_small_integers(proto)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {first_line(exc)}") from exc
    try:
        data_name = f"{path.name}.data"
        staged = staging / path.name
        if external:
            _write_external_data(proto, staging / data_name, inline_up_to)
        onnx.save_model(proto, staged)  # everything is written before anything is replaced
        if (staging / data_name).exists():
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def has_references(proto: onnx.ModelProto) -> bool:
    """Whether `proto` names memory-mapped weights (`weights.reference`) rather than holding them."""
    return any(weights.is_reference(t) for t in external_data_helper._get_initializer_tensors(proto))


def _write_external_data(proto: onnx.ModelProto, data_path: Path, inline_up_to: int) -> None:
    """Move initializer bytes (raw bytes over `inline_up_to`, and every mapped reference) into
    `data_path`, big tensors page-aligned, and point `proto` at them by relative location."""
    with open(data_path, "wb") as out:
        for tensor in external_data_helper._get_initializer_tensors(proto):
            mapped = weights.referenced(tensor) if weights.is_reference(tensor) else None
            if mapped is None and not (tensor.HasField("raw_data") and len(tensor.raw_data) > inline_up_to):
                continue
            length = mapped.nbytes if mapped is not None else len(tensor.raw_data)
            if length > weights.MAPPED_MIN_BYTES:
                out.write(bytes(-out.tell() % EXTERNAL_ALIGNMENT))
            offset = out.tell()
            if mapped is not None:
                weights.write_bytes(mapped, out)
            else:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
        empty = out.tell() == 0
    if empty:
        data_path.unlink()


# -- constant sharing -------------------------------------------------------------------------------
def unshare_constants(model: Model) -> int:
    """Give each use of an initializer its own tensor (the arrays are not copied until edited).

    Exporters de-duplicate equal initializers across unrelated layers; editing one use must not
    change the others. Returns the number of new tensors.
    """
    seen: set[str] = set()
    created = 0
    names = set(model.tensors())
    for node in model.graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            if tensor.name not in seen:
                seen.add(tensor.name)
                continue
            name = _fresh_name(f"{tensor.name}__{node.name or node.op}", names)
            node.inputs[index] = gs.Constant(name, tensor.values)
            created += 1
    return created


def dedupe_constants(model: Model) -> int:
    """Merge initializers with identical dtype, shape and bytes (undoes unneeded un-sharing)."""
    canonical: dict[tuple, gs.Constant] = {}
    outputs = {t.name for t in model.graph.outputs}
    merged = 0
    for node in model.graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or tensor.name in outputs:
                continue
            values = np.asarray(tensor.values)  # a scalar and a [1] tensor are different constants
            key = (values.dtype.str, values.shape, hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest())
            weights.release(tensor.values)
            first = canonical.setdefault(key, tensor)
            if first is not tensor:
                node.inputs[index] = first
                merged += 1
    return merged


def _fresh_name(base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


def clone_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    return copy.deepcopy(proto)
