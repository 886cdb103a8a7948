"""The contract every vector descriptor follows.

A descriptor is split in two so that decoding workers do the cheap per-image
work (`prepare`) and the process that owns the model does the batched work
(`embed`). Workers receive a `DescriptorBuilder` (plain data, picklable) and
build the descriptor themselves: live models never cross a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class Descriptor(Protocol):
    name: ClassVar[str]
    dim: int
    # Smallest image side the descriptor needs; JPEG decoding may downscale
    # in the DCT domain (PIL draft) to no less than this.
    min_side: int

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Per-image work in a decode worker: RGB image -> small fixed-shape array."""

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        """Batched work: stacked `prepare` outputs -> (n, dim) float32, L2-normalised rows."""


@dataclass(frozen=True)
class DescriptorBuilder:
    """Picklable recipe for a descriptor: name plus keyword arguments."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def cache_key(self) -> str:
        import json

        return f"{self.name}:{json.dumps(self.options, sort_keys=True, default=str)}"

    def build(self) -> Descriptor:
        from dedup.descriptors import build_descriptor

        return build_descriptor(self.name, **self.options)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # An all-zero row (flat image) stays zero instead of becoming NaN.
    return vectors / np.maximum(norms, 1e-12)
