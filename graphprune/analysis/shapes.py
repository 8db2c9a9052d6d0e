"""Shape values: what a Reshape/Expand target holds, entry by entry, when it is computed at run time.

Exporters build targets from Shape -> Gather -> Unsqueeze -> Concat chains (dynamic batch and
sequence) mixed with literal sizes (`num_heads`, `head_dim`). `shape_value` reads such a chain
back into entries:

- `Lit`: a literal from a constant, with the path of nodes from the target down to that constant,
  so the rewrite can change it (on copies of the path: chains are often shared between layers);
- `DimOf`: "the size of axis `axis` of tensor `tensor`", which follows that tensor at run time;
- `Opaque`: computed from sizes by arithmetic; it names the sizes it was computed from.

`resolve_reshape` turns entries into the output shape, solving -1 over symbolic products, which
is where ONNX's own inference gives up (it leaves such dims unknown).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar, cast

import numpy as np
import onnx_graphsurgeon as gs

#: (node, input index) steps from a target down to the constant that holds a literal
Path = tuple[tuple[gs.Node, int], ...]


@dataclass(frozen=True, eq=False)
class Lit:
    value: int
    path: Path | None  # empty when the target itself is the constant; None when it cannot be changed
    index: int = 0  # flat index of the value in that constant


@dataclass(frozen=True)
class DimOf:
    tensor: str
    axis: int


@dataclass(frozen=True)
class Scaled:
    """A run-time size times a literal (`num_kv_heads * n_rep`, `batch * num_heads`): it follows its
    source. `literal` is the constant that holds `factor` when one does (the rewrite can change
    it: `batch * num_heads` must follow the heads kept)."""

    dim: DimOf
    factor: int
    literal: Lit | None = None


@dataclass(frozen=True)
class Opaque:
    sources: frozenset[DimOf] = frozenset()


Entry = Lit | DimOf | Scaled | Opaque


def sources(entry: Entry) -> frozenset[DimOf]:
    """The run-time sizes an entry depends on."""
    if isinstance(entry, DimOf):
        return frozenset({entry})
    if isinstance(entry, Scaled):
        return frozenset({entry.dim})
    return entry.sources if isinstance(entry, Opaque) else frozenset()

MAX_DEPTH = 16


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None


def _const_ints(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if np.issubdtype(values.dtype, np.integer):
            return values
    return None


def _step(node: gs.Node, index: int, entries: list[Entry]) -> list[Entry]:
    """Entries read through input `index` of `node`: literals get the step on their path."""
    return [_step_entry(node, index, e) for e in entries]


def _step_entry(node: gs.Node, index: int, entry: Entry) -> Entry:
    if isinstance(entry, Lit):
        return _step_lit(node, index, entry)
    if isinstance(entry, Scaled) and entry.literal is not None:
        return Scaled(entry.dim, entry.factor, _step_lit(node, index, entry.literal))
    return entry


def _step_lit(node: gs.Node, index: int, lit: Lit) -> Lit:
    return lit if lit.path is None else Lit(lit.value, ((node, index),) + lit.path, lit.index)


T = TypeVar("T")


def _all_known(parts: list[T | None]) -> list[T] | None:
    """`parts` when none of them is None."""
    known = [p for p in parts if p is not None]
    return known if len(known) == len(parts) else None


def _broadcast(parts: list[list[Entry]]) -> list[tuple[Entry, ...]] | None:
    """Elementwise tuples of 1-D entry lists under numpy broadcasting (length 1 repeats)."""
    length = max(len(p) for p in parts)
    if any(len(p) not in (1, length) for p in parts):
        return None
    return [tuple(p[i] if len(p) > 1 else p[0] for p in parts) for i in range(length)]


_ARITHMETIC: dict[str, Callable[[int, int], int | None]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a // b if b else None, "Mod": lambda a, b: a % b if b else None,
    "Max": max, "Min": min,
    "Equal": lambda a, b: int(a == b)}


def _combine(op: str, a: Entry, b: Entry) -> Entry:
    if isinstance(a, Lit) and isinstance(b, Lit):
        value = _ARITHMETIC[op](a.value, b.value)
        if value is not None:
            return Lit(int(value), None)
    if op == "Mul" and isinstance(a, DimOf | Scaled | Lit) and isinstance(b, DimOf | Scaled | Lit):
        lit, dim = (a, b) if isinstance(a, Lit) else (b, a)
        if isinstance(lit, Lit) and not isinstance(dim, Lit) and lit.value > 0:
            factor = lit.value * (dim.factor if isinstance(dim, Scaled) else 1)
            base = dim.dim if isinstance(dim, Scaled) else dim
            held = lit if isinstance(dim, DimOf) and lit.path is not None else None
            return base if factor == 1 else Scaled(base, factor, held)
    if op == "Equal" and isinstance(a, DimOf | Lit) and isinstance(b, DimOf | Lit):
        lit = a if isinstance(a, Lit) else b
        if isinstance(lit, Lit) and lit.value < 0:
            return Lit(0, None)  # a size is never negative: `size == -1` is false
    return Opaque(sources(a) | sources(b))



def shape_value(tensor: gs.Tensor, depth: int = 0) -> list[Entry] | None:
    """The entries of a 0-D or 1-D integer tensor, or None when its length is unknown."""
    values = _const_ints(tensor)
    if values is not None:
        if values.ndim > 1:
            return None
        return [Lit(int(v), (), i) for i, v in enumerate(values.reshape(-1))]
    node = _producer(tensor)
    if node is None or depth > MAX_DEPTH:
        return None
    op = node.op
    if op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        rank = len(shape)
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", rank)
        start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
        return [DimOf(node.inputs[0].name, axis) for axis in range(start, end)]
    if op in ("Unsqueeze", "Squeeze", "Identity", "Cast", "Reshape", "Flatten"):
        inner = shape_value(node.inputs[0], depth + 1)
        return None if inner is None else _step(node, 0, inner)
    if op == "Concat":
        parts = _all_known([shape_value(t, depth + 1) for t in node.inputs])
        if parts is None:
            return None
        return [e for i, p in enumerate(parts) for e in _step(node, i, p)]
    if op == "Gather" and node.attrs.get("axis", 0) in (0, -1):  # shape vectors are 1-D
        data, indices = shape_value(node.inputs[0], depth + 1), _const_ints(node.inputs[1])
        if data is None or indices is None:
            return None
        picked = [data[int(i) % len(data)] if -len(data) <= int(i) < len(data) else None
                  for i in indices.reshape(-1)]
        # an index out of range (a malformed model) leaves a None entry, as it always has
        return _step(node, 0, cast(list[Entry], picked))
    if op == "Slice":
        data = shape_value(node.inputs[0], depth + 1)
        bounds = _all_known([_literal_ints(t, depth) if t.name else [] for t in node.inputs[1:]])
        if data is None or bounds is None or len(bounds) < 2 or not len(bounds[0]):
            return None
        starts, ends = bounds[0][0], bounds[1][0]
        steps = bounds[3][0] if len(bounds) > 3 and len(bounds[3]) else 1
        return _step(node, 0, data[slice(starts, ends, steps)])
    if op in _ARITHMETIC:
        parts = _all_known([shape_value(t, depth + 1) for t in node.inputs[:2]])
        pairs = None if parts is None else _broadcast([_step(node, i, p) for i, p in enumerate(parts)])
        return None if pairs is None else [_combine(op, a, b) for a, b in pairs]
    if op == "Where":
        parts = _all_known([shape_value(t, depth + 1) for t in node.inputs[:3]])
        if parts is None:
            return None
        cond, *branches = parts
        triples = _broadcast([cond] + [_step(node, i + 1, v) for i, v in enumerate(branches)])
        if triples is None:
            return None
        return [(x if c.value else y) if isinstance(c, Lit) else Opaque(sources(c) | sources(x) | sources(y))
                for c, x, y in triples]
    if op == "ConstantOfShape":
        count = _static_count(node.inputs[0], depth)
        fill = node.attrs.get("value")
        fill = 0 if fill is None else int(np.asarray(getattr(fill, "values", fill)).reshape(-1)[0])
        return None if count is None else [Lit(fill, None)] * count
    return None


def _literal_ints(tensor: gs.Tensor, depth: int) -> list[int] | None:
    """A small integer tensor known at analysis time: a constant, or literals combined by shape
    arithmetic (TorchScript computes Slice bounds as `Mod(2, 3)`)."""
    values = _const_ints(tensor)
    if values is not None:
        return [int(v) for v in values.reshape(-1)]
    entries = shape_value(tensor, depth + 1)
    if entries is None:
        return None
    literals = [e.value for e in entries if isinstance(e, Lit)]
    return literals if len(literals) == len(entries) else None


def _static_count(tensor: gs.Tensor, depth: int) -> int | None:
    """A one-element shape value known at analysis time (the length of a shape vector)."""
    values = shape_value(tensor, depth + 1)
    if values is None or len(values) != 1:
        return None
    if isinstance(values[0], Lit):
        return values[0].value
    node = _producer(tensor)
    while node is not None and node.op != "Shape" and node.inputs:
        node = _producer(node.inputs[0])
    dim = values[0]
    if node is None or not isinstance(dim, DimOf) or node.inputs[0].name != dim.tensor:
        return None
    shape = node.inputs[0].shape
    return shape[dim.axis] if shape is not None and isinstance(shape[dim.axis], int) else None


# -- symbolic products ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Product:
    """coefficient x product of named symbols: enough to match dims like batch*seq or 4*unk."""

    coef: int
    symbols: tuple[str, ...] = ()

    @staticmethod
    def of(dim: int | str | None) -> Product | None:
        if isinstance(dim, int | np.integer):
            return Product(int(dim))
        if isinstance(dim, str) and dim:
            coef, symbols = 1, []
            for part in dim.split("*"):
                if part.isdigit():
                    coef *= int(part)
                else:
                    symbols.append(part)
            return Product(coef, tuple(sorted(symbols)))
        return None

    def __mul__(self, other: Product) -> Product:
        return Product(self.coef * other.coef, tuple(sorted(self.symbols + other.symbols)))

    def divide(self, other: Product) -> Product | None:
        rest = Counter(self.symbols)
        rest.subtract(other.symbols)
        if any(v < 0 for v in rest.values()) or other.coef == 0 or self.coef % other.coef:
            return None
        return Product(self.coef // other.coef, tuple(sorted(rest.elements())))

    @property
    def dim(self) -> int | str:
        if not self.symbols:
            return self.coef
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + list(self.symbols))


@dataclass(frozen=True)
class Monomial:
    """A ratio of products of sizes, coef x symbol^power (powers may be negative): how many more
    times a unit's pattern repeats in one slot than in another (`batch` for [batch*heads] vs heads)."""

    coef: Fraction
    powers: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def of(dim: int | str) -> Monomial:
        size = Product.of(dim)
        if size is None:
            raise ValueError(f"not a size: {dim!r}")
        return Monomial(Fraction(size.coef), tuple(sorted(Counter(size.symbols).items())))

    def _combine(self, other: Monomial, sign: int) -> Monomial:
        powers = Counter(dict(self.powers))
        for symbol, power in other.powers:
            powers[symbol] += sign * power
        coef = self.coef * other.coef if sign > 0 else self.coef / other.coef
        return Monomial(coef, tuple(sorted((s, p) for s, p in powers.items() if p)))

    def __mul__(self, other: Monomial) -> Monomial:
        return self._combine(other, 1)

    def __truediv__(self, other: Monomial) -> Monomial:
        return self._combine(other, -1)

    @property
    def whole(self) -> bool:
        """A count: a positive integer coefficient and no symbol in a denominator."""
        return self.coef.denominator == 1 and self.coef >= 1 and all(p > 0 for _, p in self.powers)

    @property
    def count(self) -> int | None:
        """The number it stands for, or None when it is symbolic."""
        return int(self.coef) if not self.powers and self.coef.denominator == 1 else None


def product(dims: list) -> Product | None:
    result = Product(1)
    for dim in dims:
        p = Product.of(dim)
        if p is None:
            return None
        result = result * p
    return result


def entry_dim(entry: Entry, tensors: dict[str, gs.Tensor]) -> int | str | None:
    """The size an entry stands for (before -1 and 0 are resolved)."""
    if isinstance(entry, Lit):
        return entry.value
    if isinstance(entry, Scaled):
        base = Product.of(entry_dim(entry.dim, tensors))
        return None if base is None else (base * Product(entry.factor)).dim
    if isinstance(entry, DimOf):
        shape = getattr(tensors.get(entry.tensor), "shape", None)
        return shape[entry.axis] if shape is not None and entry.axis < len(shape) else None
    return None


def resolve_reshape(in_shape: list | None, entries: list[Entry], tensors: dict[str, gs.Tensor],
                    allowzero: int = 0) -> list | None:
    """Output shape of Reshape(x, target) from the target's entries; symbolic where needed."""
    if in_shape is None:
        return None
    dims = [entry_dim(e, tensors) for e in entries]
    for i, (entry, dim) in enumerate(zip(entries, dims, strict=True)):
        if isinstance(entry, Lit) and dim == 0 and not allowzero:
            dims[i] = in_shape[i] if i < len(in_shape) else None
    if any(d is None for d in dims):
        return None
    free = [i for i, d in enumerate(dims) if d == -1]
    if len(free) > 1:
        return None
    if free:
        total, known = product(in_shape), product([d for d in dims if d != -1])
        rest = None if total is None or known is None else total.divide(known)
        if rest is None:
            return None
        dims[free[0]] = rest.dim
    return dims


def resolve_expand(in_shape: list | None, entries: list[Entry], tensors: dict[str, gs.Tensor]) -> list | None:
    """Output shape of Expand(x, shape): numpy broadcasting of the input against the entries."""
    if in_shape is None:
        return None
    dims = [entry_dim(e, tensors) for e in entries]
    rank = max(len(in_shape), len(dims))
    a = [1] * (rank - len(in_shape)) + list(in_shape)
    b = [1] * (rank - len(dims)) + dims
    out = []
    for x, y in zip(a, b, strict=True):
        if x == 1:
            out.append(y)
        elif y == 1 or y == x:
            out.append(x)
        else:
            return None
    return None if any(d is None for d in out) else out


def is_unknown(shape: list | None) -> bool:
    return shape is None or any(d is None or (isinstance(d, str) and d.startswith("unk__")) for d in shape)


def elements(shape: list) -> int | None:
    return math.prod(shape) if all(isinstance(d, int) for d in shape) else None
