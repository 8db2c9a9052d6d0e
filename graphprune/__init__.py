"""graphprune: physically remove channels, neurons, heads and blocks from ONNX graphs."""

from graphprune.api import build_pipeline, inspect, prune
from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model, load_model, save_model
from graphprune.pipeline import parse_pipeline
from graphprune.torch.frontend import from_torch, saliency_for, taylor_saliency

__version__ = "0.1.0"

__all__ = [
    "GraphpruneError",
    "Model",
    "build_pipeline",
    "from_torch",
    "inspect",
    "load_model",
    "parse_pipeline",
    "prune",
    "saliency_for",
    "save_model",
    "taylor_saliency",
]
