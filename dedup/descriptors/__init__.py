"""Descriptor registry.

`sha256` (exact bytes) is always computed and lives in the samples table; the
vector descriptors below are stored as embeddings and searched with FAISS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.errors import DedupError


@dataclass(frozen=True)
class DescriptorInfo:
    name: str
    module: str
    class_name: str
    kind: str  # "exact" | "vector"
    needs_weights: bool
    summary: str


REGISTRY: dict[str, DescriptorInfo] = {
    "sha256": DescriptorInfo(
        "sha256", "", "", "exact", False,
        "SHA-256 of the image bytes: byte-identical copies, always computed.",
    ),
    "perceptual": DescriptorInfo(
        "perceptual", "dedup.descriptors.perceptual", "PerceptualDescriptor", "vector", False,
        "Weight-free 256-d DCT descriptor (letterbox trim, flip/rotation aware search). Offline default.",
    ),
    "clip": DescriptorInfo(
        "clip", "dedup.descriptors.clip", "ClipDescriptor", "vector", True,
        "open_clip image embedding (default ViT-B-32 / laion2b_s34b_b79k). Default where a GPU is present.",
    ),
    "torchscript": DescriptorInfo(
        "torchscript", "dedup.descriptors.torchscript", "TorchScriptDescriptor", "vector", True,
        "A user-supplied TorchScript image model (--pretrained FILE.pt), e.g. the SSCD copy detector.",
    ),
}


def vector_descriptor_names() -> list[str]:
    return [name for name, info in REGISTRY.items() if info.kind == "vector"]


def build_descriptor(name: str, **options) -> Descriptor:
    info = REGISTRY.get(name)
    if info is None or info.kind != "vector":
        raise DedupError(
            f"unknown vector descriptor {name!r}",
            hint=f"choose from {', '.join(vector_descriptor_names())} ('dedup descriptors' lists them)",
        )
    cls = getattr(importlib.import_module(info.module), info.class_name)
    return cls(**options)


def choose_default_descriptors(cuda_available: bool) -> tuple[list[str], str]:
    """The descriptors a run uses when the user names none, and why."""
    if cuda_available:
        return ["perceptual", "clip"], "a CUDA GPU is present, so CLIP runs beside the weight-free descriptor"
    return ["perceptual"], "no CUDA GPU found, so the weight-free perceptual descriptor runs (add --descriptor clip to force CLIP on CPU)"


def query_transform_for(descriptor: str):
    """Perceptual vectors are searched with their 8 flips/rotations (a sign/transposition in DCT space)."""
    if descriptor == "perceptual":
        from dedup.descriptors.perceptual import dihedral_variants

        return dihedral_variants
    return None


__all__ = [
    "REGISTRY",
    "Descriptor",
    "DescriptorBuilder",
    "DescriptorInfo",
    "build_descriptor",
    "choose_default_descriptors",
    "query_transform_for",
    "vector_descriptor_names",
]
