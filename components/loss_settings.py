"""Loss settings: the names, defaults, limits and validation shared by the CLI, both components and the loss graph.

TensorFlow-free, so that parsing flags (`tripletflow run`, `train`) and reading outputs (the report)
never pay for importing TensorFlow. `components.triplet_loss` takes its names and checks from here.
"""

from __future__ import annotations

import dataclasses
import math

DISTANCES = ("euclidean", "squared", "cosine")
MININGS = ("batch_all", "batch_hard", "semi_hard")

DEFAULT_MARGIN = 0.2
DEFAULT_DISTANCE = "euclidean"
DEFAULT_MINING = "batch_all"

# Every distance the loss graph returns is capped here (raw, unnormalized vectors of norm ~1e30 would
# otherwise overflow float32 when squared); a power of two, so scaling by it is exact.
DISTANCE_CAP = 2.0**96
# A larger margin only adds a constant to every loss, and could overflow the float32 loss sums.
MAX_MARGIN = DISTANCE_CAP


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    return distance


def check_mining(mining: str) -> str:
    if mining not in MININGS:
        raise ValueError(f"mining must be one of {', '.join(MININGS)}, got {mining!r}")
    return mining


def check_margin(margin) -> float:
    """The margin as a Python float (it is part of the graph's structure, e.g. the loss bound)."""
    value = float(margin)
    if not (math.isfinite(value) and 0.0 <= value <= MAX_MARGIN):  # also rejects NaN
        raise ValueError(f"margin must be a finite number in [0, {MAX_MARGIN:.4g}] (the distance cap), got {margin!r}")
    return value


def max_distance(distance: str, normalize: bool = True) -> float:
    """Upper bound of a distance: 2 (euclidean), 4 (squared), 2 (cosine) for unit vectors.

    Cosine distance is scale-invariant, so it is bounded by 2 either way; unnormalized
    euclidean/squared distances are unbounded (``math.inf``).
    """
    check_distance(distance)
    if distance == "cosine":
        return 2.0
    if not normalize:
        return math.inf
    return 2.0 if distance == "euclidean" else 4.0


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How pairs are measured and hinged: one value handed to every stage that calls the loss graph."""

    margin: float = DEFAULT_MARGIN
    distance: str = DEFAULT_DISTANCE
    normalize: bool = True  # L2-normalize vectors before measuring (bounded distances)

    def __post_init__(self):
        object.__setattr__(self, "margin", check_margin(self.margin))
        check_distance(self.distance)

    @property
    def max_distance(self) -> float:
        return max_distance(self.distance, self.normalize)

    @property
    def loss_bound(self) -> float:
        """Every triplet loss lies in ``[0, loss_bound]`` (``math.inf`` for unbounded raw distances)."""
        return self.max_distance + self.margin

    def graph_kwargs(self) -> dict:
        """Keyword arguments of the loss graph's public functions (``triplet_statistics``, ...)."""
        return {"margin": self.margin, "distance": self.distance, "normalize": self.normalize}
