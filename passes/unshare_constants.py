"""unshare-constants: give every use of a shared initializer its own tensor."""

from __future__ import annotations

from graphprune.ir.model import Model, unshare_constants
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register


@register
class UnshareConstantsPass(RewritePass):
    """Split initializers used by several nodes into one tensor per use.

    Reads: the graph. Changes: node inputs that share a gs.Constant get a copy (same array until
    edited). Preserves: outputs exactly (lossless). Options: none.

    Exporters de-duplicate equal initializers across unrelated layers (every LayerNorm weight of a
    fresh model, one shape constant for Q, K and V); without this pass those layers would be forced
    into one pruning group. `cleanup-graph` merges the copies that stay equal.
    """

    name = "unshare-constants"
    aliases = ("unshare",)
    same_computation = True

    @property
    def lossless(self) -> bool:
        return True

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        created = unshare_constants(model)
        return PassResult(created > 0, {"unshared": created})
