"""verify-model: check the current model against the dense one it came from."""

from __future__ import annotations

from graphprune import runtime
from graphprune.ir.model import Model
from graphprune.pipeline import AnalysisManager, AnalysisPass, register


@register
class VerifyModelPass(AnalysisPass):
    """onnx.checker, shape inference, an ORT run; output shapes equal to the dense model's.

    Reads: the model and, when the pass manager verifies, the dense model's sample inputs and
    outputs (`am.state`). Changes/Preserves: nothing (analysis). Result: `runtime.Verification` whose
    `max_abs_diff` is the largest output change relative to the dense model. Options: none.
    Raises VerificationError when any check fails.
    """

    name = "verify-model"
    aliases = ("verify",)
    result = runtime.Verification

    def run(self, model: Model, am: AnalysisManager) -> runtime.Verification:
        state = am.state
        if state.verification is not None:
            return state.verification  # the pass manager verified the model after the last rewrite that changed it
        proto = model.to_onnx()
        feeds = state.feeds or runtime.sample_inputs(proto)
        state.verification, _ = runtime.verify(proto, feeds, state.output_shapes, state.dense_outputs)
        return state.verification
