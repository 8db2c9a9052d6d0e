"""graphprune's passes, one per file; importing this package registers them all."""

from graphprune.passes.analyze_deps import AnalyzeDepsPass
from graphprune.passes.cleanup_graph import CleanupGraphPass
from graphprune.passes.compensate_bias import CompensateBiasPass
from graphprune.passes.drop_blocks import DropBlocksPass
from graphprune.passes.prune_sequential import PruneSequentialPass
from graphprune.passes.prune_units import PruneUnitsPass
from graphprune.passes.reconstruct import ReconstructPass
from graphprune.passes.score_importance import ScoreImportancePass
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.passes.unshare_constants import UnshareConstantsPass
from graphprune.passes.verify_model import VerifyModelPass

__all__ = [
    "AnalyzeDepsPass",
    "CleanupGraphPass",
    "CompensateBiasPass",
    "DropBlocksPass",
    "PruneSequentialPass",
    "PruneUnitsPass",
    "ReconstructPass",
    "ScoreImportancePass",
    "SparsifyWeightsPass",
    "UnshareConstantsPass",
    "VerifyModelPass",
]
