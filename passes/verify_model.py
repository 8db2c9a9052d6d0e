"""verify-model: check the current model against the dense one it came from."""

from __future__ import annotations

from graphprune import runtime
from graphprune.ir import Model
from graphprune.pipeline import LAST_VERIFICATION, AnalysisManager, AnalysisPass, register


@register
class VerifyModelPass(AnalysisPass):
    """onnx.checker, shape inference, an ORT run; output shapes equal to the dense model's.

    Reads: the model and, when the pass manager verifies, the dense model's sample inputs and
    outputs (`am.context`). Changes/Preserves: nothing (analysis). Result: `runtime.Verification` whose
    `max_abs_diff` is the largest output change relative to the dense model. Options: none.
    Raises VerificationError when any check fails.
    """

    name = "verify-model"
    aliases = ("verify",)

    def run(self, model: Model, am: AnalysisManager) -> runtime.Verification:
        if (done := am.context.get(LAST_VERIFICATION)) is not None:
            return done  # the pass manager verified the model after the last rewrite that changed it
        proto = model.to_onnx()
        feeds = am.context.get("feeds") or runtime.sample_inputs(proto)
        check, _ = runtime.verify(proto, feeds, am.context.get("output_shapes"), am.context.get("dense_outputs"))
        am.context[LAST_VERIFICATION] = check
        return check
