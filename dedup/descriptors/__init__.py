"""Descriptor registry: each descriptor's policy lives in its entry, not in branches across the stages.

`sha256` (exact bytes) is always computed and lives in the samples table; the
vector descriptors below are stored as embeddings and searched with FAISS.
Adding a descriptor is one module (a class following `base.Descriptor`) plus
one `register(DescriptorInfo(...))` call.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dedup.descriptors.base import Descriptor, DescriptorBuilder
from dedup.errors import DedupError

# Chaining guard: a member must be within this of the edge threshold when
# compared with its cluster's representative directly (tuned on the generated
# benchmark sets, see BENCHMARKS.md).
GUARD_OFFSET = 0.08
# `clip` follows common LAION near-duplicate practice (>= 0.95 for ViT-B-32); it
# could not be calibrated here because no CLIP weights can be downloaded offline.
CLIP_THRESHOLD = 0.95
# Neighbours are searched this far below the cut, so a slightly looser cut can be applied later from the
# stored edges without searching again.
SEARCH_MARGIN = 0.04


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DescriptorInfo:
    """One descriptor: how to build it, and the policy every stage applies to it."""

    name: str
    module: str
    class_name: str
    kind: str  # "exact" | "vector"
    needs_weights: bool
    summary: str
    # A float, or "module:ATTR" read lazily (so the registry imports no model code).
    default_threshold: float | str = 0.9
    guard_offset: float = GUARD_OFFSET
    search_margin: float = SEARCH_MARGIN
    # "module:function" mapping (n, d) queries to (variants, n, d): searched like extra queries.
    query_variants: str | None = None
    # Settings fields handed to the builder as keyword arguments (e.g. the CLI's --model).
    cli_options: tuple[str, ...] = ()
    # One tiny forward pass before any shard is read, so a bad checkpoint fails at once.
    warm_up: bool = False
    supports_text: bool = False
    # Its model needs every core on a CPU, so decoding runs inline (measured: benchmarks/bench_embed.py).
    uses_all_cores_on_cpu: bool = False
    # Options that may name a file: made absolute when the run starts, so query and compare find it from anywhere.
    path_options: tuple[str, ...] = ()
    extra_options: dict[str, Any] = field(default_factory=dict)

    def threshold(self) -> float:
        value = self.default_threshold
        return float(_resolve(value) if isinstance(value, str) else value)

    def query_transform(self) -> Callable | None:
        return _resolve(self.query_variants) if self.query_variants else None


REGISTRY: dict[str, DescriptorInfo] = {}


def register(info: DescriptorInfo) -> DescriptorInfo:
    """Add (or replace) a registry entry; tests register toy descriptors this way."""
    REGISTRY[info.name] = info
    return info


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


register(DescriptorInfo(
    "sha256", "", "", "exact", False,
    "SHA-256 of the image bytes: byte-identical copies, always computed.",
    default_threshold=1.0,
))
register(DescriptorInfo(
    "perceptual", "dedup.descriptors.perceptual", "PerceptualDescriptor", "vector", False,
    "Weight-free 256-d DCT descriptor (letterbox trim, flip/rotation aware search). Offline default.",
    default_threshold="dedup.descriptors.perceptual:DEFAULT_THRESHOLD",
    query_variants="dedup.descriptors.perceptual:dihedral_variants",
))
register(DescriptorInfo(
    "clip", "dedup.descriptors.clip", "ClipDescriptor", "vector", True,
    "open_clip image embedding (default ViT-B-32 / laion2b_s34b_b79k). Default where a GPU is present.",
    default_threshold=CLIP_THRESHOLD,
    cli_options=("model", "pretrained", "device", "gpu_decode"), path_options=("model", "pretrained"),
    warm_up=True, supports_text=True, uses_all_cores_on_cpu=True,
))
register(DescriptorInfo(
    "precomputed", "", "", "vector", False,
    "Precomputed image embeddings (dedup run --embeddings DIR: clip-retrieval / LAION layout); describes no new image.",
    default_threshold="dedup.stages.precomputed:PRECOMPUTED_THRESHOLD",
    search_margin=0.02,  # at LAION scale every 0.01 below the cut adds many near-miss edges
))
register(DescriptorInfo(
    "torchscript", "dedup.descriptors.torchscript", "TorchScriptDescriptor", "vector", True,
    "A user-supplied TorchScript image model (--pretrained FILE.pt), e.g. the SSCD copy detector.",
    default_threshold="dedup.descriptors.torchscript:DEFAULT_THRESHOLD",
    cli_options=("pretrained", "image_size", "mean", "std", "resize", "device"),
    path_options=("pretrained",), warm_up=True,
))


def made_outside(name: str) -> bool:
    """The descriptor's vectors come from a model dedup has no builder of (`precomputed` embeddings)."""
    return not descriptor_policy(name).module


def describable(names: list[str]) -> list[str]:
    """The names dedup can describe an image with (not vectors made outside it, such as `precomputed`)."""
    return [name for name in names if not made_outside(name)]


def vector_descriptor_names() -> list[str]:
    return [name for name, info in REGISTRY.items() if info.kind == "vector"]


def descriptor_policy(name: str) -> DescriptorInfo:
    info = REGISTRY.get(name)
    if info is None:
        raise DedupError(
            f"unknown descriptor {name!r}",
            hint=f"choose from {', '.join(vector_descriptor_names())} (sha256 is always computed); 'dedup descriptors' lists them",
        )
    return info


def build_descriptor(name: str, **options) -> Descriptor:
    info = descriptor_policy(name)
    if info.kind != "vector":
        raise DedupError(f"{name!r} is not a vector descriptor", hint=f"choose from {', '.join(vector_descriptor_names())}")
    if made_outside(name):
        raise DedupError(f"the {name!r} vectors were made outside dedup, which cannot describe a new image with them",
                         hint="query such a run with --key, or embed with --descriptor clip (--model/--pretrained of that model)")
    cls = getattr(importlib.import_module(info.module), info.class_name)
    return cls(**options)


def query_transform_for(descriptor: str):
    """The query variants a descriptor is searched with (perceptual: its 8 flips/rotations), or None."""
    info = REGISTRY.get(descriptor)
    return info.query_transform() if info is not None else None


def builder_options(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The builder's keyword arguments: the entry's fixed options plus the CLI values it takes."""
    info = descriptor_policy(name)
    options = {**info.extra_options, **{k: values[k] for k in info.cli_options if k in values and values[k] is not None}}
    for key in info.path_options:
        path = Path(str(options.get(key, ""))).expanduser()
        if key in options and path.exists():  # a tag or model name stays as given
            options[key] = str(path.resolve())
    return options


def cuda_available() -> bool:
    """A CUDA GPU torch can use; False (not an error) where torch is not installed (the lean install)."""
    if not gpu_driver_present():
        return False  # the same answer torch gives, without its import (~5 s of CPU for a CUDA build)
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# Device files of the kernel drivers a torch GPU build needs: NVIDIA's (CUDA), and AMD's (ROCm answers as cuda).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def gpu_driver_present() -> bool:
    """On Linux, whether a GPU kernel driver is loaded; elsewhere True (only torch can tell)."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in GPU_DRIVER_PATHS)


def choose_default_descriptors(cuda: bool) -> tuple[list[str], str]:
    """The descriptors a run uses when the user names none, and why."""
    if cuda:
        return ["perceptual", "clip"], "a CUDA GPU is present, so CLIP runs beside the weight-free descriptor"
    return ["perceptual"], "no CUDA GPU found, so the weight-free perceptual descriptor runs (add --descriptor clip to force CLIP on CPU)"


def torch_installed() -> bool:
    """Whether torch can be imported, found without importing it (a finder may also refuse by raising)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def default_reason() -> str:
    """Why the default descriptors are what they are here (printed by `dedup run`)."""
    if not torch_installed():
        return ("torch is not installed, so the weight-free perceptual descriptor runs "
                "(pip install 'dedup[clip]' to add CLIP)")
    return choose_default_descriptors(cuda_available())[1]


def resolve_descriptor_names(names: list[str], device: str = "auto", cuda: bool | None = None) -> list[str]:
    """Validated, de-duplicated names; the default set when none are given."""
    if not names:
        cuda = cuda_available() if cuda is None and device != "cpu" else bool(cuda)
        return choose_default_descriptors(cuda)[0]
    names = list(dict.fromkeys(names))
    for name in names:
        if descriptor_policy(name).kind != "vector":
            raise DedupError(f"{name!r} is always computed; it is not a --descriptor choice",
                             hint=f"choose from {', '.join(vector_descriptor_names())}")
    return names


__all__ = [
    "REGISTRY",
    "Descriptor",
    "DescriptorBuilder",
    "DescriptorInfo",
    "build_descriptor",
    "builder_options",
    "choose_default_descriptors",
    "default_reason",
    "describable",
    "descriptor_policy",
    "made_outside",
    "query_transform_for",
    "register",
    "resolve_descriptor_names",
    "unregister",
    "vector_descriptor_names",
]
