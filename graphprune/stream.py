"""Block-streamed calibration: run a model over all calibration batches one stretch of nodes at a time.

A `Walk` holds, for every calibration batch, the tensors live at its position in the graph (the
residual stream, attention mask and rotary tables of a transformer between two layers); `advance`
runs the next stretch of nodes on every batch and hands back the wanted tensors they made. Work is
linear in depth: each node runs once per batch, and only the nodes the wanted tensors need run (no
LM head when no logits are wanted). A caller that changes weights between stretches (`reconstruct`
refits one layer, then runs on) sees every later layer on the refit ones' outputs, as SparseGPT and
Wanda stream a decoder block by block.

Live tensors of all batches are kept in memory up to `MEMORY_BYTES`, beyond that in files under a
temporary folder (memory-mapped when read back).
"""

from __future__ import annotations

import bisect
import logging
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.calib import batches, sequence_is_dynamic
from graphprune.ir.model import Model

logger = logging.getLogger(__name__)

#: live tensors of all batches beyond this size are written to disk
MEMORY_BYTES = 4 << 30


class _Store:
    """Arrays by (batch, name), in memory up to a budget and memory-mapped files after it."""

    def __init__(self, budget: int | None = None) -> None:
        self.arrays: dict[tuple[int, str], np.ndarray] = {}
        self.budget = MEMORY_BYTES if budget is None else budget
        self.in_memory = 0
        self.folder: tempfile.TemporaryDirectory | None = None
        self.files = 0
        self.peak = 0

    def put(self, key: tuple[int, str], array: np.ndarray) -> None:
        self.drop(key)
        if self.in_memory + array.nbytes > self.budget and array.nbytes > 0:
            if self.folder is None:
                self.folder = tempfile.TemporaryDirectory(prefix="graphprune-stream-")
                logger.info("calibration activations over %.1f GiB: the rest goes to %s",
                            self.budget / 2**30, self.folder.name)
            self.files += 1
            path = Path(self.folder.name) / f"{self.files}.npy"
            np.save(path, array)
            self.arrays[key] = np.load(path, mmap_mode="r")
        else:
            self.arrays[key] = array
            self.in_memory += array.nbytes
            self.peak = max(self.peak, self.in_memory)

    def get(self, key: tuple[int, str]) -> np.ndarray:
        return self.arrays[key]

    def drop(self, key: tuple[int, str]) -> None:
        old = self.arrays.pop(key, None)
        if old is None:
            return
        if isinstance(old, np.memmap):
            assert old.filename is not None  # a memmap is opened from a path (`put`'s np.load)
            Path(old.filename).unlink(missing_ok=True)
        else:
            self.in_memory -= old.nbytes

    def names(self, batch: int) -> list[str]:
        return [name for index, name in self.arrays if index == batch]

    def close(self) -> None:
        self.arrays.clear()
        if self.folder is not None:
            self.folder.cleanup()


class Walk:
    """The calibration batches at one position of a model's node list (see module doc).

    `wanted`: the tensors callers collect; only their ancestors run. `feeds`: the model's inputs,
    first axis samples. A caller may change the model's constants between `advance` calls; nodes
    must not be added or removed meanwhile.
    """

    def __init__(self, model: Model, wanted: Collection[str], feeds: Mapping[str, np.ndarray],
                 batch: int) -> None:
        self.model = model
        self.wanted = set(wanted)
        graph = model.graph
        tensors = model.tensors()
        missing = [name for name in self.wanted if name not in tensors or isinstance(tensors[name], gs.Constant)]
        if missing:
            raise KeyError(f"no activation named {', '.join(sorted(missing))} in the model")
        graph.toposort()
        order = {id(node): i for i, node in enumerate(graph.nodes)}
        self.nodes = _needed_nodes(graph, self.wanted)
        self.order = order
        self.places = [order[id(node)] for node in self.nodes]  # graph positions of the nodes that run
        # where each tensor is last read, as a position in `nodes`: a tensor is live at position p when
        # made before p and read at p or later (readers that do not run count where they would run)
        self.last_use: dict[str, int] = {}
        for node in graph.nodes:
            for tensor in _reads(node):
                self.last_use[tensor.name] = max(self.last_use.get(tensor.name, -1), self._place(node))
        self.position = 0
        self.batches = list(batches(feeds, batch, trim=sequence_is_dynamic({t.name: t.shape for t in graph.inputs})))
        self.store = _Store()
        self.pending = sorted(self.wanted & set(feeds))  # wanted graph inputs: handed out by the first advance
        for index, chunk in enumerate(self.batches):
            for name, array in chunk.items():
                if name in self.last_use or name in self.wanted:
                    self.store.put((index, name), array)

    def _place(self, node: gs.Node, after: bool = False) -> int:
        """The position in `nodes` where `node` runs (or would run, when it need not)."""
        return (bisect.bisect_right if after else bisect.bisect_left)(self.places, self.order[id(node)])

    def __len__(self) -> int:
        return len(self.batches)

    def live(self, batch: int) -> dict[str, np.ndarray]:
        """The tensors live at the current position for one batch."""
        return {name: self.store.get((batch, name)) for name in self.store.names(batch)}

    def advance(self, until: gs.Node | None = None, through: gs.Node | None = None,
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Runs the nodes from the current position up to `until` (not included), or up to and with
        `through`, or to the end, on every batch; yields (batch index, the wanted tensors made)."""
        final = until is None and through is None  # nothing is held after the last stretch
        stop = len(self.nodes) if final else \
            self._place(until) if until is not None else self._place(through, after=True)
        if stop < self.position:
            node = until or through
            assert node is not None  # the final stretch (neither given) never lies behind
            raise ValueError(f"node {node.name} was already run")
        stretch = self.nodes[self.position:stop]
        self.position = stop
        pending, self.pending = self.pending, []
        if not stretch and not pending:
            return
        made = {t.name for node in stretch for t in node.outputs if t.name}
        keep = [name for name in made if not final and self.last_use.get(name, -1) >= stop]
        handed = sorted(made & self.wanted)
        outputs = list(dict.fromkeys(keep + handed))
        session = None
        for index in range(len(self.batches)):
            live = self.live(index)
            values: dict[str, np.ndarray] = {name: np.asarray(live[name]) for name in pending}
            if stretch:
                if session is None:
                    proto = self._proto(stretch, live, outputs)
                    session = runtime.session(proto, threads=2)
                    inputs = [i.name for i in proto.graph.input]
                values |= dict(zip(outputs, session.run(outputs, {n: np.asarray(live[n]) for n in inputs}),
                                   strict=True))
            for name in live:  # what nobody reads any more leaves
                if final or self.last_use.get(name, -1) < stop:
                    self.store.drop((index, name))
            for name in keep:
                self.store.put((index, name), values[name])
            yield index, {name: values[name] for name in pending + handed}
        logger.debug("stream: nodes %d-%d of %d, %.0f MiB held in memory", stop - len(stretch), stop,
                     len(self.nodes), self.store.in_memory / 2**20)

    def close(self) -> None:
        self.store.close()

    def _proto(self, stretch: list[gs.Node], live: dict[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
        tensors = self.model.tensors()
        inputs = sorted({t.name for node in stretch for t in _reads(node) if t.name in live})
        graph = gs.Graph(nodes=stretch, inputs=[tensors[n] for n in inputs], outputs=[tensors[n] for n in outputs],
                         opset=self.model.graph.opset, import_domains=self.model.graph.import_domains)
        proto = gs.export_onnx(graph, do_type_check=False)
        proto.ir_version = max(self.model.ir_version, 4)
        for value in proto.graph.input:  # declared from the arrays: any batch or sequence size
            array = live[value.name]
            value.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            value.type.tensor_type.ClearField("shape")
        for value in proto.graph.output:
            value.type.tensor_type.ClearField("shape")
        return proto


class Collector(Protocol):
    """What `collect` feeds: the tensors it wants, and a method taking them batch by batch."""

    @property
    def tensors(self) -> Collection[str]: ...

    def add(self, batch: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None: ...


def collect(model: Model, feeds: Mapping[str, np.ndarray], collectors: list[Collector], batch: int) -> None:
    """One pass over the calibration data for several collectors, running only the nodes their
    tensors need (no LM head, no cache outputs)."""
    wanted = set().union(*(c.tensors for c in collectors))
    if not wanted:
        return
    walk = Walk(model, wanted, feeds, batch)
    try:
        for index, values in walk.advance():
            for collector in collectors:
                collector.add(walk.batches[index], values)
    finally:
        walk.close()


def _reads(node: gs.Node) -> Iterator[gs.Variable]:
    """The activations a node reads, including those its subgraphs take from the outer scope."""
    for tensor in node.inputs:
        if isinstance(tensor, gs.Variable) and tensor.name:
            yield tensor
    for subgraph in node.subgraphs():
        inner = {t.name for n in subgraph.nodes for t in n.outputs} | {t.name for t in subgraph.inputs}
        for inner_node in subgraph.nodes:
            for tensor in _reads(inner_node):
                if tensor.name not in inner:
                    yield tensor


def _needed_nodes(graph: gs.Graph, wanted: set[str]) -> list[gs.Node]:
    """The nodes the wanted tensors depend on, in graph order."""
    producers = {t.name: node for node in graph.nodes for t in node.outputs}
    needed: set[int] = set()
    stack = [producers[name] for name in wanted if name in producers]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(producers[t.name] for t in _reads(node) if t.name in producers)
    return [node for node in graph.nodes if id(node) in needed]
