"""`clip`: open_clip image embeddings (and text embeddings for `dedup query --text`).

Split as the `Descriptor` contract asks:

* `prepare` (decode workers) applies open_clip's own resize/crop for the model
  and returns uint8 pixels: 4x less inter-process traffic than float32, and no
  weights are needed, so workers never load the model.
* `embed` (the process owning the model) builds the model on first use,
  converts to float, normalises with the model's mean/std on the device and
  runs `encode_image` under `torch.inference_mode()` and autocast.

Where the weights come from: `pretrained` is an open_clip tag (downloaded once
through the Hugging Face Hub cache) or a local checkpoint file; `model` is an
open_clip model name, an `hf-hub:org/repo` name, or a local model-config JSON.
huggingface_hub retries an unreachable Hub for about 45 s per file before it
looks at its cache, so every open_clip call that may touch the Hub runs in
offline mode unless the Hub answers a quick probe (`_hub_guard`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dedup.descriptors.base import l2_normalize
from dedup.errors import DedupError, ModelLoadError, missing_extra

# torch, torchvision and open_clip come with the clip extra only; this module is imported when
# clip is chosen (the registry imports it by name), so a lean install learns the pip command here.
try:
    import open_clip
    import torch
    from open_clip.transform import MaybeToTensor, PreprocessCfg, merge_preprocess_dict
    from torchvision.transforms import Compose, Normalize
except ImportError as exc:
    raise missing_extra(exc, "clip", "The clip descriptor") from exc

HF_HUB_PREFIX = "hf-hub:"
PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_PROBE_TIMEOUT_S = 5.0
_LOAD_HINT = (
    "pass --pretrained PATH with a local open_clip checkpoint file, "
    "or use --descriptor perceptual (weight-free, works offline)"
)
_MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


# ---------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA where present, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DedupError(f"unknown device {device!r} for clip: {exc}", hint="use --device auto, cpu or cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DedupError(f"device {device!r} asked for, but torch sees no CUDA GPU", hint="use --device cpu")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products in hardware (AMX tiles or AVX512-BF16).

    Measured with benchmarks/bench_clip_forward.py (ViT-B-32, batch 32) on a
    2-core AMD EPYC with AVX2 only: fp32 2.29 images/s, bf16 autocast 0.59
    images/s. Without these instructions oneDNN emulates bf16 and is ~4x slower
    than fp32, so bf16 is only chosen where the hardware has them.
    """
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise."""
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise DedupError(f"unknown precision {precision!r} for clip", hint=f"use auto or one of {', '.join(PRECISIONS)}")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


# ---------------------------------------------------------------------------
# Hugging Face Hub access


@functools.cache
def _hub_reachable() -> bool:
    """One quick probe per process; any HTTP answer, even an error status, means the Hub is reachable."""
    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def _hub_guard() -> Iterator[None]:
    """Run open_clip Hub calls offline (cache only) unless the Hub answers.

    huggingface_hub reads `constants.HF_HUB_OFFLINE` on every request, so
    switching it for the duration is enough; with it set, a file missing from
    the cache fails at once instead of after minutes of retries.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode() or _hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _hub_situation() -> str:
    """Why only the local cache was tried, for load-failure messages."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched"
    if not _hub_reachable():
        return f"{constants.ENDPOINT} did not answer, so only the local Hugging Face cache was searched"
    return f"{constants.ENDPOINT} is reachable"


# ---------------------------------------------------------------------------
# Model specification (config only, no weights)


@dataclass(frozen=True)
class ModelSpec:
    """What open_clip needs to build the model, resolved without loading weights."""

    open_clip_name: str  # passed to open_clip.create_model / get_tokenizer
    pretrained: str | None  # tag or file for create_model; None where the name carries its weights (hf-hub:)
    label: str  # "model/pretrained", for messages
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any]  # open_clip PreprocessCfg fields


_registered_config_files: set[Path] = set()


def _register_model_config(path: Path) -> str:
    """Register a local model-config JSON with open_clip; its file stem becomes the model name."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read clip model config {path}: {exc}", hint=_LOAD_HINT) from exc
    missing = [key for key in _MODEL_CONFIG_KEYS if key not in config]
    if missing:
        raise ModelLoadError(
            f"clip model config {path} lacks {', '.join(missing)}",
            hint="give an open_clip model config (keys embed_dim, vision_cfg, text_cfg) or an open_clip model name",
        )
    resolved = path.resolve()
    if resolved not in _registered_config_files:
        open_clip.add_model_config(resolved)
        _registered_config_files.add(resolved)
    return path.stem


def _base_preprocess(model_cfg: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocess defaults, then the weights' own settings, then the model's image size."""
    preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), overlay)
    preprocess["size"] = model_cfg["vision_cfg"]["image_size"]
    return preprocess


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def _hub_model_spec(model: str) -> ModelSpec:
    repo_id = model[len(HF_HUB_PREFIX):]
    try:
        with _hub_guard():
            config_path = open_clip.pretrained.download_pretrained_from_hf(
                repo_id, filename=open_clip.constants.HF_CONFIG_NAME
            )
        config = json.loads(Path(config_path).read_text())
        model_cfg = config["model_cfg"]
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"cannot fetch the open_clip config of {model} ({_hub_situation()}): {exc}",
            hint=_LOAD_HINT,
        ) from exc
    # open_clip takes weights from the hf-hub repository itself and ignores `pretrained`.
    return ModelSpec(model, None, model, model_cfg, _base_preprocess(model_cfg, config.get("preprocess_cfg", {})))


def _named_model_spec(model: str, pretrained: str) -> ModelSpec:
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise ModelLoadError(f"clip model config file {model} does not exist", hint=_LOAD_HINT)
        name = _register_model_config(Path(model))
    else:
        name = model.replace("/", "-")  # as open_clip.create_model cleans names
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelLoadError(
            f"unknown open_clip model {model!r} (pretrained {pretrained!r})",
            hint=f"use an open_clip model name such as ViT-B-32 (open_clip.list_models()), a model-config JSON; "
            f"or {_LOAD_HINT}",
        )
    label = f"{model}/{pretrained}"
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if tag_cfg:
        return ModelSpec(name, pretrained, label, model_cfg, _base_preprocess(model_cfg, tag_cfg))
    if pretrained and Path(pretrained).is_file():
        # A bare checkpoint carries no preprocess settings: open_clip's defaults (OpenAI mean/std, bicubic) apply.
        return ModelSpec(name, pretrained, label, model_cfg, _base_preprocess(model_cfg, {}))
    if pretrained and _looks_like_path(pretrained):
        raise ModelLoadError(f"clip checkpoint file {pretrained} for model {model} does not exist", hint=_LOAD_HINT)
    known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    raise ModelLoadError(
        f"{pretrained!r} is neither a pretrained tag of open_clip model {model} (known tags: {known}) "
        f"nor an existing checkpoint file",
        hint=_LOAD_HINT,
    )


def resolve_model_spec(model: str, pretrained: str) -> ModelSpec:
    if model.startswith(HF_HUB_PREFIX):
        return _hub_model_spec(model)
    return _named_model_spec(model, pretrained)


def geometry_transform(preprocess: dict[str, Any]) -> Compose:
    """open_clip's eval transform without ToTensor/Normalize: PIL in, resized and cropped PIL out.

    Taking open_clip's own steps (rather than re-implementing them) keeps the
    resize rounding, crop offsets and resize_mode handling identical to what
    the weights were trained with.
    """
    full = open_clip.image_transform(
        preprocess["size"],
        is_train=False,
        mean=preprocess["mean"],
        std=preprocess["std"],
        resize_mode=preprocess["resize_mode"],
        interpolation=preprocess["interpolation"],
        fill_color=preprocess["fill_color"],
    )
    return Compose([step for step in full.transforms if not isinstance(step, (MaybeToTensor, Normalize))])


def _image_size(preprocess: dict[str, Any]) -> tuple[int, int]:
    size = preprocess["size"]
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def _resolve_gpu_decode(gpu_decode: bool | str, device: torch.device, preprocess: dict[str, Any]) -> bool:
    """`auto`: batched nvJPEG decoding on CUDA where the preprocess is one it reproduces; else PIL per image."""
    from dedup.descriptors.gpu_decode import supports_preprocess

    if gpu_decode == "auto":
        return device.type == "cuda" and supports_preprocess(preprocess)
    if gpu_decode not in (True, False):
        raise DedupError(f"clip gpu_decode must be auto, true or false, not {gpu_decode!r}", hint="use gpu_decode=auto")
    if gpu_decode and not supports_preprocess(preprocess):
        raise DedupError(
            f"batched decoding cannot reproduce this model's preprocess ({preprocess['resize_mode']}, "
            f"{preprocess['interpolation']}, size {preprocess['size']})",
            hint="run clip with gpu_decode=False (the CPU preprocess handles every open_clip mode)",
        )
    return bool(gpu_decode)


# ---------------------------------------------------------------------------
# The descriptor


class ClipDescriptor:
    name: ClassVar[str] = "clip"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str = "laion2b_s34b_b79k",
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 256,
        gpu_decode: bool | str = "auto",
        channels_last: bool | str = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DedupError(f"clip batch_size must be >= 1, got {batch_size}", hint="use --batch-size 256")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.spec = resolve_model_spec(model, pretrained)
        self.dim = int(self.spec.model_cfg["embed_dim"])
        self.image_size = _image_size(self.spec.preprocess)
        self.min_side = max(self.image_size)
        self._geometry = geometry_transform(self.spec.preprocess)
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._mean = torch.tensor(self.spec.preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.gpu_decode = _resolve_gpu_decode(gpu_decode, self.device, self.spec.preprocess)
        self.channels_last = self.device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphed: Any = None

    def describe_device(self) -> str:
        return f"clip {self.spec.label} on {self.device} ({self.precision})"

    # -- worker side -------------------------------------------------------

    def prepare(self, image: Image.Image) -> np.ndarray:
        """RGB image -> (3, H, W) uint8 after the model's resize and center crop."""
        resized = self._geometry(image.convert("RGB"))
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))

    # -- model side --------------------------------------------------------

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) uint8 -> (n, dim) float32, L2-normalised rows."""
        pixels = np.asarray(prepared)
        expected = (3, *self.image_size)
        if pixels.ndim != 4 or pixels.shape[1:] != expected or pixels.dtype != np.uint8:
            raise ValueError(
                f"clip embed expects stacked prepare() output of shape (n, {', '.join(map(str, expected))}) uint8, "
                f"got {pixels.shape} {pixels.dtype}"
            )
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._loaded_model()
        chunks = [
            self._encode_pixels(model, pixels[start : start + self.batch_size])
            for start in range(0, len(pixels), self.batch_size)
        ]
        return l2_normalize(np.concatenate(chunks))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, L2-normalised rows, in the same space as `embed`."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._loaded_model()
        tokens = self._loaded_tokenizer()(list(texts))
        chunks = []
        for start in range(0, len(tokens), self.batch_size):
            batch = tokens[start : start + self.batch_size].to(self.device)
            with torch.inference_mode(), _autocast(self.device, self.precision):
                chunks.append(model.encode_text(batch).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks))

    def _encode_pixels(self, model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(pixels).to(self.device)
        # Same arithmetic as ToTensor + Normalize, in float32 before autocast narrows anything.
        normalised = (batch.float().div(255) - self._mean) / self._std
        with torch.inference_mode(), _autocast(self.device, self.precision):
            features = model.encode_image(normalised)
        return features.float().cpu().numpy()

    # -- batched GPU-decode path (dedup.gpu_embed) ---------------------------

    def batch_preprocess(self):
        """The batched decode + resize + crop + normalise for this model, on this descriptor's device."""
        from dedup.descriptors.gpu_decode import BatchPreprocess

        return BatchPreprocess(self.spec.preprocess, self.device)

    def encode_normalised(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) float32 model input already on the device -> (n, dim) float32, L2-normalised rows."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self.launch_encode(batch).cpu().numpy())

    def launch_encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Queue the image tower on `batch`; (n, dim) float32 features on the device, not yet synchronised.

        The GPU stage copies them out asynchronously and launches the next batch
        before waiting, so kernel launches overlap the previous batch's compute.
        """
        model = self._loaded_model()
        if self.channels_last:
            # The patch-embedding convolution reads NHWC faster on tensor cores; the result is the same.
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs and self.device.type == "cuda":
            return self._graphed_encoder(model)(batch).float()
        with torch.inference_mode(), _autocast(self.device, self.precision):
            return model.encode_image(batch).float()

    def _graphed_encoder(self, model: torch.nn.Module):
        if self._graphed is None:
            from dedup.descriptors.cuda_graphs import GraphedEncoder

            self._graphed = GraphedEncoder(model, self.device, _AUTOCAST_DTYPES.get(self.precision), self.batch_size)
        return self._graphed

    def _loaded_model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._load_model()
            self._mean = self._mean.to(self.device)
            self._std = self._std.to(self.device)
        return self._model

    def _load_model(self) -> torch.nn.Module:
        try:
            with _hub_guard():
                # fp32 weights; autocast narrows per operation, which keeps LayerNorm and softmax in fp32.
                model = open_clip.create_model(
                    self.spec.open_clip_name,
                    pretrained=self.spec.pretrained,
                    device="cpu",
                    precision="fp32",
                    require_pretrained=True,
                )
        except Exception as exc:  # any failure here is a weights problem: report it with the way out
            raise ModelLoadError(
                f"cannot load clip weights for {self.spec.label} ({_hub_situation()}): {exc}", hint=_LOAD_HINT
            ) from exc
        output_dim = getattr(model.visual, "output_dim", None)  # timm image towers do not record it
        if output_dim is not None and output_dim != self.dim:
            raise ModelLoadError(
                f"clip {self.spec.label}: the image tower outputs {output_dim}-d vectors, the config says {self.dim}",
                hint=_LOAD_HINT,
            )
        return model.to(self.device).eval()

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            try:
                with _hub_guard():
                    self._tokenizer = open_clip.get_tokenizer(self.spec.open_clip_name)
            except Exception as exc:  # HF tokenizers download files: same failure modes as the weights
                raise ModelLoadError(
                    f"cannot load the clip tokenizer for {self.spec.label} ({_hub_situation()}): {exc}",
                    hint=_LOAD_HINT,
                ) from exc
        return self._tokenizer
