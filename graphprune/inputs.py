"""What the caller gives the passes and the criteria they run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PassInputs:
    """Calibration feeds, labels (one per calibration sample), per-weight saliency arrays by
    initializer name, and the seed of anything random."""

    calibration: Mapping[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    saliency: Mapping[str, np.ndarray] | None = None
    seed: int = 0
