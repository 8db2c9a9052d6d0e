"""Deployment builds: one TOML config from a model to a deployable folder.

    source → export → prune (+ reconstruct) → recover (distill) → fuse → quantize → verify → bench → report

`graphprune build CONFIG.toml` on the command line; from Python:

    from graphprune.build import build
    result = build("examples/minilm.toml")            # runs, or reuses, every stage
    result.report["comparisons"]                        # pruned vs dense latency ratios, same run

Stages are cached by content hash in `.<output>.stages/` beside the output folder; see README "Deployment builds".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphprune.build.config import BuildConfig, ConfigKeyError, load_config
from graphprune.build.runner import BuildError, BuildResult, describe, plan, run_build

__all__ = ["BuildConfig", "BuildError", "BuildResult", "ConfigKeyError", "build", "describe", "load_config", "plan",
           "run_build"]


def build(config: str | Path, overrides: dict[str, dict[str, Any]] | None = None, **options: Any) -> BuildResult:
    """Load `config` (with `overrides`: section -> key -> value) and run it; see `run_build`."""
    return run_build(load_config(config, overrides), **options)
