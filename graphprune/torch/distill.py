"""Knowledge distillation: train a pruned (student) ONNX model to match its dense (teacher) model.

The student is lowered to torch (`graphprune.torch.lowering`), so any model graphprune can prune can be
trained, whatever it was exported from. The teacher runs in ONNX Runtime. Per batch of `data`:

- every float output of the student is pulled towards the teacher's: `mse` (mean squared error
  divided by the teacher output's mean square, so outputs of any scale weigh alike) or `kl`
  (KL divergence of the softened class distributions over the last axis, temperature T, times T²;
  with `top_k`, over the teacher's k most likely classes and one bucket for the rest: a causal LM's
  next-token distribution over a 49,152-token vocabulary puts nearly all its mass on a few dozen);
- with `hidden`, also the intermediate states both models have under the same name and shape
  (the outputs of LayerNormalization and of residual Adds: the residual stream, which pruning
  heads and neurons leaves at full width), by normalized MSE, averaged and added to the loss;
- for text models (an `attention_mask` input), padding positions take no part in the loss and
  batches are cut to their longest real sequence.

Trained parameters are written back into the student's initializers; the caller saves and verifies.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from graphprune import runtime
from graphprune.analysis.state import fit_empty_inputs, state_tensors
from graphprune.calib import ATTENTION_MASK, batches, dynamic_sequence, positions
from graphprune.errors import GraphpruneError, OptionError, VerificationError
from graphprune.ir.model import Model
from graphprune.torch.lowering import lower, write_back

logger = logging.getLogger(__name__)

LOSSES = ("mse", "kl")
#: ops whose outputs are the residual stream in a transformer: matched as hidden states
HIDDEN_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})


class DistillError(GraphpruneError):
    """Student and teacher that cannot be distilled (different inputs or outputs)."""


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = 2
    lr: float = 1e-4
    batch: int = 16
    loss: str = "mse"  # on the outputs; see the module doc
    temperature: float = 2.0  # for kl
    top_k: int = 0  # for kl: the teacher's k most likely classes only (0: all); LM vocabularies are large
    hidden: bool = False  # also match shared intermediate states
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch < 1:
            raise OptionError(f"distill needs --epochs >= 1 and --batch >= 1, got {self.epochs} and {self.batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"--lr must be a positive number, got {self.lr}")
        if self.loss not in LOSSES:
            raise OptionError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            raise OptionError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise OptionError(f"--top-k must be >= 0 (0: every class), got {self.top_k}")


@dataclass
class DistillResult:
    steps: list[float] = field(default_factory=list)  # training loss per step
    loss_before: float = 0.0  # mean loss over the data before and after training (no updates)
    loss_after: float = 0.0
    hidden: list[str] = field(default_factory=list)  # matched intermediate states
    parameters_changed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"loss_before": self.loss_before, "loss_after": self.loss_after, "steps": len(self.steps),
                "hidden_states": len(self.hidden), "parameters_changed": self.parameters_changed,
                "seconds": round(self.seconds, 1)}


def hidden_states(student: Model, teacher: Model) -> list[str]:
    """Intermediate float tensors both models have with the same name and the same (known) shape."""
    theirs = teacher.tensors()
    names = []
    for node in student.graph.nodes:
        residual = node.op == "Add" and all(not hasattr(t, "values") for t in node.inputs)
        if node.op not in HIDDEN_OPS and not residual:
            continue
        out = node.outputs[0]
        other = theirs.get(out.name)
        if other is None or out.shape is None or other.shape is None or list(out.shape) != list(other.shape):
            continue
        if out.dtype is not None and np.issubdtype(np.dtype(out.dtype), np.floating):
            names.append(out.name)
    outputs = {t.name for t in student.graph.outputs}
    return [n for n in names if n not in outputs]


def _check_pair(student: Model, teacher: Model) -> None:
    def signature(tensors) -> list[tuple[str, str]]:
        return [(t.name, str(np.dtype(t.dtype)) if t.dtype is not None else "?") for t in tensors]

    if signature(student.graph.inputs) != signature(teacher.graph.inputs):
        raise DistillError("student and teacher take different inputs: "
                           f"{[t.name for t in student.graph.inputs]} vs {[t.name for t in teacher.graph.inputs]}")
    if len(student.graph.outputs) != len(teacher.graph.outputs):
        raise DistillError(f"student has {len(student.graph.outputs)} outputs, the teacher "
                           f"{len(teacher.graph.outputs)}")


def _normalized_mse(s: torch.Tensor, t: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    if mask is not None:
        keep = torch.from_numpy(mask)
        s, t = s[keep], t[keep]
    return F.mse_loss(s, t) / t.square().mean().clamp_min(1e-12)


def _kl(s: torch.Tensor, t: torch.Tensor, mask: np.ndarray | None, temperature: float, top_k: int = 0,
        ) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions over the last axis, per row; with
    `top_k`, over the teacher's k most likely classes plus one bucket for all the others (zero
    exactly when the student gives those k classes the teacher's probabilities)."""
    if mask is not None:
        keep = torch.from_numpy(mask)
        s, t = s[keep], t[keep]
    student = F.log_softmax(s.reshape(-1, s.shape[-1]) / temperature, -1)
    teacher = F.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, -1)
    if 0 < top_k < teacher.shape[-1]:
        teacher, classes = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, classes)
        teacher, student = _with_rest(teacher), _with_rest(student)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def _with_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of some classes, and one more column: the log of the mass left over."""
    rest = torch.log1p(-log_probs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([log_probs, rest], dim=-1)


class _Objective:
    """The loss of one batch: student (lowered, with the hidden states as extra outputs) vs teacher."""

    def __init__(self, student: Model, teacher: Model, options: DistillOptions) -> None:
        self.options = options
        self.outputs = [t.name for t in teacher.graph.outputs]  # the student's match them by position
        state = state_tensors(student)  # a KV cache's present outputs are state, not predictions
        self.float_outputs = [i for i, t in enumerate(student.graph.outputs) if t.name not in state
                              and t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating)]
        if not self.float_outputs:
            raise DistillError("the student has no floating-point output to distill")
        self.hidden = hidden_states(student, teacher) if options.hidden else []
        tensors = student.tensors()
        extended = student.copy()
        ext_tensors = extended.tensors()
        extended.graph.outputs.extend(ext_tensors[name] for name in self.hidden)
        self.module = lower(extended)
        self.inputs = [t.name for t in student.graph.inputs if t.name not in student.constants()]
        self.shapes = {t.name: t.shape for t in student.graph.inputs}
        teacher_proto = runtime.with_outputs(teacher.to_onnx(), {n: tensors[n].dtype for n in self.hidden})
        self.teacher = runtime.session(teacher_proto, threads=2)
        self.trim = dynamic_sequence(teacher_proto)

    def batches(self, feeds: dict[str, np.ndarray]):
        return batches(feeds, self.options.batch, trim=self.trim)

    def __call__(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        targets = self.teacher.run(self.outputs + self.hidden, batch)
        student_batch = fit_empty_inputs(self.shapes, batch)
        produced = self.module(*(torch.from_numpy(np.ascontiguousarray(student_batch[n])) for n in self.inputs))
        produced = produced if isinstance(produced, tuple) else (produced,)
        loss = torch.zeros(())
        for i in self.float_outputs:
            s, t = produced[i], torch.from_numpy(np.asarray(targets[i], np.float32))
            mask = positions(batch, targets[i])
            if self.options.loss == "kl":
                loss = loss + _kl(s, t, mask, self.options.temperature, self.options.top_k)
            else:
                loss = loss + _normalized_mse(s, t, mask)
        if self.hidden:
            base = len(self.outputs)
            terms = [_normalized_mse(produced[base + k], torch.from_numpy(np.asarray(targets[base + k], np.float32)),
                                     positions(batch, targets[base + k])) for k in range(len(self.hidden))]
            loss = loss + torch.stack(terms).mean()
        return loss

    def mean_loss(self, feeds: dict[str, np.ndarray]) -> float:
        with torch.no_grad():
            values = [(float(self(b)), len(next(iter(b.values())))) for b in self.batches(feeds)]
        return sum(v * n for v, n in values) / max(sum(n for _, n in values), 1)


def distill(student: Model, teacher: Model, feeds: dict[str, np.ndarray], options: DistillOptions = DistillOptions(),
            progress: Callable[[int, int, float], None] | None = None) -> DistillResult:
    """Train `student` in place (its initializers) to match `teacher` on `feeds` (see module doc).
    `progress(step, total, loss)` is called after every step."""
    options.check()
    _check_pair(student, teacher)
    if ATTENTION_MASK in feeds:
        logger.debug("text inputs: padding positions are left out of the loss")
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    objective = _Objective(student, teacher, options)
    result = DistillResult(hidden=objective.hidden)
    result.loss_before = objective.mean_loss(feeds)
    module = objective.module
    optimizer = torch.optim.AdamW(module.parameters(), lr=options.lr, weight_decay=0.0)
    count = len(next(iter(feeds.values())))
    per_epoch = math.ceil(count / options.batch)
    total = per_epoch * options.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * step / total)))
    rng = np.random.default_rng(options.seed)
    module.train()
    for epoch in range(options.epochs):
        if epoch:
            logger.info("distill: epoch %d/%d done, last loss %.4g", epoch, options.epochs, result.steps[-1])
        order = rng.permutation(count)
        shuffled = {name: array[order] for name, array in feeds.items()}
        for batch in objective.batches(shuffled):
            optimizer.zero_grad(set_to_none=True)
            loss = objective(batch)
            if not torch.isfinite(loss):
                raise DistillError(f"the loss became {float(loss.detach())} at step {len(result.steps) + 1}; try a smaller --lr")
            loss.backward()
            optimizer.step()
            schedule.step()
            result.steps.append(float(loss.detach()))
            if progress:
                progress(len(result.steps), total, result.steps[-1])
    module.eval()
    result.loss_after = objective.mean_loss(feeds)
    result.parameters_changed = write_back(student, module)
    result.seconds = time.perf_counter() - start
    return result


def verify_student(student: Model, teacher: Model, feeds: dict[str, np.ndarray],
                   samples: int = 2) -> runtime.Verification:
    """onnx.checker, an ORT run and output shapes equal to the teacher's on the first `samples`."""
    sample = {name: array[:samples] for name, array in feeds.items()}
    expected, _ = runtime.verify(teacher.to_onnx(), sample)
    check, _ = runtime.verify(student.to_onnx(), fit_empty_inputs({t.name: t.shape for t in student.graph.inputs},
                                                                   sample))
    state = state_tensors(student)  # cache outputs may have lost heads; the predictions keep their shapes
    for output, got, wanted in zip(student.graph.outputs, check.output_shapes, expected.output_shapes, strict=True):
        if output.name not in state and got != wanted:
            raise VerificationError(f"output {output.name} changed shape from {list(wanted)} to {list(got)}")
    return check


def plot_losses(result: DistillResult, path: Path, title: str = "distillation") -> Path:
    """The training loss per step (and its running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(result.steps) + 1)
    window = max(1, len(steps) // 20)
    smooth = np.convolve(result.steps, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, result.steps, color="#9ab", linewidth=1, label="loss per step")
    ax.plot(steps[window - 1:], smooth, color="#135", linewidth=2, label=f"running mean ({window} steps)")
    ax.axhline(result.loss_before, color="#c44", linestyle="--", linewidth=1,
               label=f"before: {result.loss_before:.4g}")
    ax.axhline(result.loss_after, color="#4a4", linestyle="--", linewidth=1, label=f"after: {result.loss_after:.4g}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
