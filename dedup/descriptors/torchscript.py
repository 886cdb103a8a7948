"""`torchscript`: a user-supplied TorchScript image model as a descriptor (`--pretrained FILE.pt`).

Copy-detection models are distributed this way: SSCD (Pizzi et al. 2022, the model Somepalli et al.
used to measure replication in diffusion models) ships `sscd_disc_mixup.torchscript.pt`. The model
takes a float (n, 3, S, S) batch normalised with `mean`/`std` and returns (n, d) descriptors; dedup
L2-normalises them, so similarities are cosines.

* `prepare` (decode workers, no torch) resizes with PIL and returns uint8 (3, S, S): `resize="square"`
  squashes to S x S (SSCD's batched recipe, `Resize([320, 320])`), `resize="crop"` resizes the short
  side to S and centre-crops.
* `embed` (the model-owning process) loads the model on first use, normalises and runs it under
  `torch.inference_mode()`.

torch is imported only when a model runs; without it a DedupError names the install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dedup.descriptors.base import l2_normalize
from dedup.errors import DedupError, ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SSCD's suggested copy cut for its disc_mixup descriptors (cosine); pass --threshold torchscript=X for others.
DEFAULT_THRESHOLD = 0.75
RESIZE_MODES = ("square", "crop")
_INSTALL_HINT = "pip install 'dedup[clip]' (it brings torch)"


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise DedupError(f"the torchscript descriptor needs torch, which is not installed ({exc})", hint=_INSTALL_HINT) from exc
    return torch


def _triple(values: Sequence[float] | str, what: str) -> tuple[float, float, float]:
    """'0.5,0.5,0.5' or a sequence of 3 numbers -> 3 floats."""
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        triple = tuple(float(v) for v in items)
    except ValueError:
        triple = ()
    if len(triple) != 3 or (what == "std" and min(triple) <= 0):
        raise DedupError(f"torchscript {what} must be 3 numbers{' above 0' if what == 'std' else ''}, got {values!r}",
                         hint=f"e.g. --{what} {','.join(str(v) for v in (IMAGENET_MEAN if what == 'mean' else IMAGENET_STD))}")
    return triple  # type: ignore[return-value]


class TorchScriptDescriptor:
    name: ClassVar[str] = "torchscript"

    def __init__(self, pretrained: str = "", image_size: int = 320, mean: Sequence[float] | str = IMAGENET_MEAN,
                 std: Sequence[float] | str = IMAGENET_STD, resize: str = "square", device: str = "auto",
                 batch_size: int = 64) -> None:
        if importlib.util.find_spec("torch") is None:
            raise DedupError("the torchscript descriptor needs torch, which is not installed", hint=_INSTALL_HINT)
        if not pretrained or not Path(pretrained).is_file():
            raise ModelLoadError(f"TorchScript model file {pretrained!r} does not exist",
                                 hint="pass --pretrained FILE.pt, a model saved with torch.jit.save (e.g. SSCD's *.torchscript.pt)")
        if int(image_size) < 8 or resize not in RESIZE_MODES or int(batch_size) < 1:
            raise DedupError(f"bad torchscript settings: image_size={image_size}, resize={resize!r}, batch_size={batch_size}",
                             hint=f"image size >= 8, resize one of {', '.join(RESIZE_MODES)}, batch size >= 1")
        self.path, self.image_size, self.resize = str(pretrained), int(image_size), resize
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        self.device_name, self.batch_size = device, int(batch_size)
        self.min_side = self.image_size
        self._model: Any = None
        self._dim: int | None = None

    # -- worker side (no torch) ------------------------------------------------

    def prepare(self, image: Image.Image) -> np.ndarray:
        """RGB image -> (3, S, S) uint8, squashed or short-side resized and centre-cropped."""
        image = image.convert("RGB")
        side = self.image_size
        if self.resize == "crop":
            scale = side / min(image.size)
            width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        else:
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    # -- model side -------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Output width, found by running the model once (workers never ask)."""
        if self._dim is None:
            self._dim = int(self._forward(np.zeros((1, 3, self.image_size, self.image_size), np.uint8)).shape[1])
        return self._dim

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        pixels = np.asarray(prepared)
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or pixels.shape[1:] != expected or pixels.dtype != np.uint8:
            raise ValueError(f"torchscript embed expects (n, {', '.join(map(str, expected))}) uint8, got {pixels.shape} {pixels.dtype}")
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        chunks = [self._forward(pixels[s:s + self.batch_size]) for s in range(0, len(pixels), self.batch_size)]
        return l2_normalize(np.concatenate(chunks))

    def describe_device(self) -> str:
        return f"torchscript {Path(self.path).name} on {self._device()} (input {self.image_size}px, {self.resize})"

    def _device(self):
        torch = _torch()
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DedupError(f"device {self.device_name!r} asked for, but torch sees no CUDA GPU", hint="use --device cpu")
        return device

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        torch = _torch()
        model, device = self._loaded(), self._device()
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).float().div(255)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        with torch.inference_mode():
            output = model((batch - mean) / std)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != len(pixels):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelLoadError(f"TorchScript model {self.path} returned {shape}, not one vector per image",
                                 hint="the model must map a (n, 3, S, S) float batch to (n, d) descriptors")
        return output.float().cpu().numpy()

    def _loaded(self):
        if self._model is None:
            torch = _torch()
            try:
                self._model = torch.jit.load(self.path, map_location=self._device()).eval()
            except Exception as exc:  # any failure here is a bad file: report it with the way out
                raise ModelLoadError(f"cannot load TorchScript model {self.path}: {type(exc).__name__}: {exc}",
                                     hint="save the model with torch.jit.save(torch.jit.script(model), FILE.pt)") from exc
        return self._model
