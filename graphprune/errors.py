"""Errors a user can hit: each says what was wrong, where, and what to do."""

from __future__ import annotations


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose (the CLI prints it as one line)."""


class ModelLoadError(GraphpruneError):
    """The input file is missing, unreadable, not ONNX, or refers to data it may not use."""


class InvalidGraphError(GraphpruneError):
    """The graph itself is malformed (undefined tensors, failed checker)."""


class PipelineError(GraphpruneError):
    """A pipeline text or a pass option is wrong."""


class VerificationError(GraphpruneError):
    """A pass produced a model that does not verify; names the pass and the passes before it."""


class OptionError(GraphpruneError):
    """A user option is out of range or contradicts another one."""


class OutputError(GraphpruneError):
    """An output file cannot be written, or would overwrite an input."""
