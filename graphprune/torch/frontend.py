"""PyTorch entry: export a module with torch.onnx.export (the torch.export/FX path) into a Model."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model, check_graph, first_line

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20
TORCHSCRIPT_OPSET = 17


class ExportError(GraphpruneError):
    """torch.onnx.export failed or the factory could not be found."""


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs torchvision notices and prints progress; keep the user's terminal clean."""
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo",
                                                   "onnxscript")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)


EXPORTERS = ("dynamo", "torchscript")


@contextlib.contextmanager
def _no_ir_dump():
    """The TorchScript exporter dumps its whole IR graph to stderr when an op cannot be exported
    (torch 2.x enables that C++ log by mistake: it tests the function, not its result); the
    one-line error says enough, so the log call is a no-op while we export."""
    import torch

    original = getattr(torch._C, "_jit_onnx_log", None)
    if original is not None:
        torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        if original is not None:
            torch._C._jit_onnx_log = original


def export_proto(module: Any, example_inputs: Sequence[Any], input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, dynamic_batch: bool = False,
                 opset: int | None = None, dynamic_axes: Sequence[int] | None = None,
                 exporter: str = "dynamo") -> onnx.ModelProto:
    """`torch.onnx.export` of `module` in eval mode; returns the ONNX proto.

    `dynamic_axes` (e.g. `(0, 1)` for batch and sequence) makes those axes of every input of at
    least that rank dynamic; `dynamic_batch` is `dynamic_axes=(0,)`. `exporter` is "dynamo"
    (torch.export, opset 20 by default) or "torchscript" (the legacy tracer, opset 17 by default).
    """
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    module = module.eval()
    args = tuple(example_inputs)
    axes = tuple(dynamic_axes or ()) or ((0,) if dynamic_batch else ())
    if 0 in axes:
        # torch.export specializes a size-1 dim: trace a dynamic batch with two samples
        args = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == 1 else a
                     for a in args)
    names = list(input_names or []) or [f"input_{i}" for i in range(len(args))]
    axis_names = {0: "batch", 1: "seq"}
    per_input = [{axis: axis_names.get(axis, f"dim{axis}") for axis in axes
                  if isinstance(a, torch.Tensor) and axis < a.ndim} for a in args]
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                program = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                            output_names=list(output_names or []) or None,
                                            dynamic_shapes=tuple(per_input) if axes else None,
                                            opset_version=opset or DEFAULT_OPSET, verbose=False)
                if program is None:  # only with an f= path, which is not given
                    raise ExportError(f"torch.onnx.export (dynamo) returned nothing for {type(module).__name__}")
                proto = program.model_proto
            else:
                buffer = io.BytesIO()
                with _no_ir_dump():
                    torch.onnx.export(module, args, buffer,  # type: ignore[arg-type]  # a file object works
                                      dynamo=False, input_names=names,
                                      output_names=list(output_names or []) or None,
                                      dynamic_axes={n: d for n, d in zip(names, per_input, strict=False) if d}
                                      or None, opset_version=opset or TORCHSCRIPT_OPSET)
                proto = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:
        raise ExportError(f"torch.onnx.export ({exporter}) failed for {type(module).__name__}: "
                          f"{first_line(exc)}") from exc
    check_graph(proto, where=f"export of {type(module).__name__}")
    return proto


def from_torch(module: Any, example_inputs: Sequence[Any], input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None, dynamic_batch: bool = False,
               opset: int | None = None, dynamic_axes: Sequence[int] | None = None,
               exporter: str = "dynamo") -> Model:
    """Export a torch module to the graphprune IR, keeping the given input names."""
    return Model.from_onnx(export_proto(module, example_inputs, input_names, output_names, dynamic_batch, opset,
                                        dynamic_axes, exporter))


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve "package.module:factory" to a callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExportError(f"'{spec}' is not of the form MODULE:FACTORY (e.g. graphprune.models.mlp:simple_net)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExportError(f"cannot import module '{module_name}': {first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExportError(f"module '{module_name}' has no callable '{attr}'")
    return factory


def export_factory(spec: str, **kwargs: Any) -> Model:
    """Call a factory returning `(module, example_inputs)` or a module with `example_inputs()`."""
    try:
        built = load_factory(spec)()
    except GraphpruneError:
        raise
    except Exception as exc:
        raise ExportError(f"factory '{spec}' raised {type(exc).__name__}: {first_line(exc)}") from exc
    if isinstance(built, tuple) and len(built) == 2:
        module, example_inputs = built
    elif hasattr(built, "example_inputs"):
        module, example_inputs = built, built.example_inputs()
    else:
        raise ExportError(f"factory '{spec}' must return (module, example_inputs) or a module with an "
                          "example_inputs() method")
    names = kwargs.pop("input_names", None) or getattr(module, "input_names", None)
    return from_torch(module, example_inputs, input_names=names, **kwargs)


# -- torch autograd saliency (first-order Taylor) -------------------------------------------------------
def taylor_saliency(module: Any, loss_fn: Callable[[Any, Any], Any], batches: Iterable[tuple[Any, Any]],
                    ) -> dict[str, np.ndarray]:
    """Per-weight first-order Taylor terms (dL/dw) * w, summed over `batches`, by parameter name.

    Summed per unit (see the `saliency` importance) this is the unit's contribution
    sum_i (dL/dw_i) * w_i: the first-order change of the loss when the unit is removed.
    """
    import torch

    totals = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    module.eval()
    for inputs, targets in batches:
        module.zero_grad()
        loss = loss_fn(module(inputs), targets)
        loss.backward()
        for name, param in module.named_parameters():
            if param.grad is not None:
                totals[name] += (param.grad * param).detach()
    return {name: t.numpy().astype(np.float64) for name, t in totals.items()}


def map_parameters(model: Model, module: Any) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (parameter name, transposed) by exact value match.

    The exporter renames and pre-transposes weights (`val_56`, [in, out]); values survive. An
    initializer equal to several parameters maps to the first one.
    """
    params = [(name, p.detach().cpu().numpy()) for name, p in module.named_parameters()]
    mapping: dict[str, tuple[str, bool]] = {}
    for const in model.weights():
        values = np.asarray(const.values)
        matches = [(name, False) for name, array in params
                   if array.shape == values.shape and np.array_equal(array, values)]
        matches += [(name, True) for name, array in params
                    if array.ndim == 2 and array.T.shape == values.shape and np.array_equal(array.T, values)]
        if len(matches) > 1:
            logger.warning("initializer '%s' equals parameters %s; using '%s' for it",
                           const.name, ", ".join(m[0] for m in matches), matches[0][0])
        if matches:
            mapping[const.name] = matches[0]
    return mapping


def saliency_for(model: Model, module: Any, saliency: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Re-key parameter-name saliency to the model's initializer names (transposing as needed)."""
    return {init: (saliency[param].T if transposed else saliency[param])
            for init, (param, transposed) in map_parameters(model, module).items() if param in saliency}
