"""Batched GPU preprocessing for `clip`: JPEG bytes -> nvJPEG -> one batched resize + crop + normalise.

Why: on a GPU the model outruns CPU JPEG decoding and PIL resizing (clip-retrieval
is bound there, at about 2,500 images/s per A100). Here baseline JPEGs are decoded
by nvJPEG (`torchvision.io.decode_jpeg(device='cuda')`, which uses the chip's
hardware JPEG engines where it has them), and all images of a batch are resized
and centre-cropped by two batched matrix products whose rows are PIL's own
resampling weights. The pixels therefore match the CPU path (open_clip's
preprocess on PIL) to within a rounding step, without a per-image PIL call.

Which samples go to the GPU is decided from the header alone (`jpeg_route.gpu_route`):
baseline JPEGs in RGB or grayscale, no EXIF rotation, ending in an end-of-image
marker, within the size limits. Everything else (PNG, WebP, CMYK, progressive,
rotated, truncated, too small, too large) takes the CPU decoder
(`dedup.decode.decode_image`) exactly as the CPU pipeline does, so its status is
the one the CPU pipeline records. A JPEG that the decoder still rejects comes
back as None from `decode`, for the caller to decode again on the CPU, alone:
a bad image never fails its batch.

The device is a parameter: the same code runs with device='cpu' (decode_jpeg on
CPU tensors), which is how the tests check it against the per-image path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dedup.descriptors.jpeg_route import DEFAULT_MAX_GPU_PIXELS, gpu_route
from dedup.errors import DedupError
from dedup.image_quality import ANALYSIS_SIDE

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which has no batched nvJPEG path yet;
# the warning would repeat on every batch.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

__all__ = ["DEFAULT_MAX_GPU_PIXELS", "BatchPreprocess", "gpu_route", "resample_weights", "supports_preprocess"]

SUPPORTED_RESIZE_MODES = ("shortest", "squash")
# float32 elements of one padded resize group (1 GiB); bounds the GPU memory one batch takes.
_GROUP_ELEMENTS = 2**28
# A group may hold at most this many padded pixels per real pixel before a new group starts.
_MAX_PADDING_RATIO = 2.0
_WEIGHT_CACHE_ENTRIES = 4096  # distinct (size, resized size, offset) axes kept; ~3.5 KB per 1000 px axis


# ---------------------------------------------------------------- PIL's resampling weights, batched


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


_FILTERS = {"bicubic": (2.0, _bicubic), "bilinear": (1.0, _triangle)}


def resample_weights(size_in: int, size_out: int, offset: int, out_len: int, interpolation: str) -> np.ndarray:
    """(out_len, size_in) float64: row o is PIL's filter for output pixel offset + o of a size_in -> size_out resize.

    This is PIL's `precompute_coeffs` (antialiased: the kernel widens by the
    downscale factor), evaluated densely so that a batch of images resizes as
    one matrix product; rows are cut to the crop window by `offset`/`out_len`.
    """
    support, kernel = _FILTERS[interpolation]
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    reach = support * filterscale
    center = ((np.arange(out_len, dtype=np.float64) + offset + 0.5) * scale)[:, None]
    first = np.maximum(np.trunc(center - reach + 0.5), 0.0)
    stop = np.minimum(np.trunc(center + reach + 0.5), size_in)
    source = np.arange(size_in, dtype=np.float64)[None, :]
    weights = np.where((source >= first) & (source < stop), kernel((source - center + 0.5) / filterscale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=weights, where=total != 0)


def _round_to_uint8_range(values: torch.Tensor) -> torch.Tensor:
    # PIL rounds half up and clips after each 8-bit pass.
    return torch.floor(values + 0.5).clamp_(0.0, 255.0)


def resized_size(height: int, width: int, size: int, resize_mode: str) -> tuple[int, int]:
    """torchvision's Resize(int) on PIL (shorter side -> size, longer truncated), or a squash to size x size."""
    if resize_mode == "squash":
        return size, size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop offsets (top, left)."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


def padding_groups(shapes: Sequence[tuple[int, int]], max_elements: int = _GROUP_ELEMENTS) -> list[list[int]]:
    """Indexes of similar-sized images, sorted by size, each group cheap to zero-pad to its largest member."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        height, width = shapes[index]
        grown = [*current, index]
        padded = len(grown) * max(shapes[i][0] for i in grown) * max(shapes[i][1] for i in grown)
        if current and (3 * padded > max_elements or padded > _MAX_PADDING_RATIO * (real + height * width)):
            groups.append(current)
            grown, real = [index], 0
        current, real = grown, real + height * width
    if current:
        groups.append(current)
    return groups


# ---------------------------------------------------------------- the batched preprocess


def _pil_nearest_sources(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel in PIL's NEAREST resize (its affine "scale" path).

    PIL steps a double from half a step by repeated addition and truncates; the
    rounding of that running sum, not (i + 0.5) * step, decides ties.
    """
    step = size_in / size_out
    positions = np.add.accumulate(np.concatenate([[0.5 * step], np.full(size_out - 1, step)]))
    return np.minimum(positions.astype(np.int64), size_in - 1)


def supports_preprocess(preprocess: dict[str, Any]) -> bool:
    """Whether `BatchPreprocess` reproduces this open_clip preprocess (square input, shortest/squash, PIL filter)."""
    size = preprocess["size"]
    square = isinstance(size, (int, float)) or (len(size) == 2 and int(size[0]) == int(size[1]))
    mode = preprocess.get("resize_mode") or "shortest"
    return square and mode in SUPPORTED_RESIZE_MODES and (preprocess.get("interpolation") or "bicubic") in _FILTERS


class BatchPreprocess:
    """open_clip's eval preprocess for a whole batch on one device: decode, resize, crop, normalise."""

    def __init__(self, preprocess: dict[str, Any], device: torch.device | str = "cpu") -> None:
        if not supports_preprocess(preprocess):
            raise DedupError(
                f"GPU decoding supports square inputs, resize modes {', '.join(SUPPORTED_RESIZE_MODES)} and "
                f"bicubic or bilinear resampling, not {preprocess.get('resize_mode')!r} with "
                f"{preprocess.get('interpolation')!r} at size {preprocess['size']}",
                hint="run clip with gpu_decode=False (the CPU preprocess handles every open_clip mode)",
            )
        size = preprocess["size"]
        self.size = int(size) if isinstance(size, (int, float)) else int(size[0])
        self.resize_mode = preprocess.get("resize_mode") or "shortest"
        self.interpolation = preprocess.get("interpolation") or "bicubic"
        self.device = torch.device(device)
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._pin = self.device.type == "cuda"
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    # -- decode ------------------------------------------------------------

    def decode(self, datas: Sequence[bytes]) -> list[torch.Tensor | None]:
        """JPEG bytes -> (3, h, w) uint8 tensors on the device; None where this decoder rejects the bytes."""
        if not datas:
            return []
        encoded = self._host_tensors(datas)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            # One bad image fails the whole call (no partial results): find it by decoding one at a time.
            return [self._decode_one(tensor) for tensor in encoded]

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _host_tensors(self, datas: Sequence[bytes]) -> list[torch.Tensor]:
        """One (pinned, on CUDA) host buffer holding every bitstream; the decoder reads slices of it."""
        sizes = [len(d) for d in datas]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self._pin)
        view = buffer.numpy()
        tensors, start = [], 0
        for data, size in zip(datas, sizes, strict=True):
            view[start : start + size] = np.frombuffer(data, dtype=np.uint8)
            tensors.append(buffer[start : start + size])
            start += size
        return tensors

    # -- geometry ----------------------------------------------------------

    def resize_crop(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, h_i, w_i) uint8 images -> (n, 3, S, S) float32 holding whole numbers 0..255, as PIL would give."""
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32, device=self.device)
        shapes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        for group in padding_groups(shapes):
            pixels = self._resize_group([images[i] for i in group], [shapes[i] for i in group])
            out[torch.tensor(group, device=self.device)] = pixels
        return out

    def _resize_group(self, images: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        max_h, max_w = max(s[0] for s in shapes), max(s[1] for s in shapes)
        padded = torch.zeros((len(images), 3, max_h, max_w), dtype=torch.float32, device=self.device)
        for slot, (image, (height, width)) in enumerate(zip(images, shapes, strict=True)):
            padded[slot, :, :height, :width].copy_(image)
        plans = [self._plan(height, width) for height, width in shapes]
        rows = self._weights([(s[0], p[0], p[2]) for s, p in zip(shapes, plans, strict=True)], max_h)
        cols = self._weights([(s[1], p[1], p[3]) for s, p in zip(shapes, plans, strict=True)], max_w)
        # PIL's order: the horizontal pass, rounded to 8 bits, then the vertical pass.
        horizontal = _round_to_uint8_range(torch.matmul(padded, cols.transpose(1, 2).unsqueeze(1)))
        return _round_to_uint8_range(torch.matmul(rows.unsqueeze(1), horizontal))

    def _weights(self, axes: Sequence[tuple[int, int, int]], max_in: int) -> torch.Tensor:
        """(B, S, max_in) weights for (input size, resized size, crop offset) per image.

        Shards mostly hold a few image sizes (img2dataset resizes to a fixed
        side), so each distinct axis is computed once and gathered per image.
        """
        unique = list(dict.fromkeys(axes))
        stacked = torch.stack([torch.nn.functional.pad(self._axis_weights(a), (0, max_in - a[0])) for a in unique])
        where = {axis: i for i, axis in enumerate(unique)}
        return stacked[torch.tensor([where[a] for a in axes], device=self.device)]

    def _axis_weights(self, axis: tuple[int, int, int]) -> torch.Tensor:
        cached = self._cache.get(axis)
        if cached is None:
            if len(self._cache) >= _WEIGHT_CACHE_ENTRIES:
                self._cache.clear()
            weights = resample_weights(*axis, self.size, self.interpolation)
            cached = torch.from_numpy(weights.astype(np.float32)).to(self.device)
            self._cache[axis] = cached
        return cached

    def _plan(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) for one image."""
        new_h, new_w = resized_size(height, width, self.size, self.resize_mode)
        top, left = crop_offsets(new_h, new_w, self.size) if self.resize_mode == "shortest" else (0, 0)
        return new_h, new_w, top, left

    # -- quality signals ---------------------------------------------------

    def reduced_copies(self, images: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Each image's (h, w, 3) uint8 nearest-neighbour copy, long side ANALYSIS_SIDE, as PIL makes it.

        `dedup.image_quality` measures colourfulness and letterbox bars on this
        copy; taking the same pixels on the device keeps those columns equal to
        the CPU path's without bringing whole images back to the host.
        """
        if not images:
            return []
        small = [self._nearest_reduce(image).permute(1, 2, 0).reshape(-1) for image in images]
        host = torch.cat(small).cpu().numpy()
        shapes = [self._reduced_shape(int(im.shape[1]), int(im.shape[2])) for im in images]
        offsets = np.cumsum([0] + [h * w * 3 for h, w in shapes])
        return [host[offsets[i] : offsets[i + 1]].reshape(h, w, 3) for i, (h, w) in enumerate(shapes)]

    @staticmethod
    def _reduced_shape(height: int, width: int) -> tuple[int, int]:
        scale = ANALYSIS_SIDE / max(height, width)
        if scale >= 1:
            return height, width
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _nearest_reduce(self, image: torch.Tensor) -> torch.Tensor:
        height, width = int(image.shape[1]), int(image.shape[2])
        new_h, new_w = self._reduced_shape(height, width)
        if (new_h, new_w) == (height, width):
            return image
        rows = torch.from_numpy(_pil_nearest_sources(height, new_h)).to(image.device)
        cols = torch.from_numpy(_pil_nearest_sources(width, new_w)).to(image.device)
        return image.index_select(1, rows).index_select(2, cols)

    # -- normalise ---------------------------------------------------------

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """0..255 pixels -> model input; the same float32 arithmetic as ClipDescriptor's CPU path."""
        return (pixels.float().div(255) - self.mean) / self.std

    def from_prepared(self, prepared: np.ndarray) -> torch.Tensor:
        """(n, 3, S, S) uint8 from `ClipDescriptor.prepare` (the CPU fallback) -> device, via pinned memory."""
        host = torch.from_numpy(np.ascontiguousarray(prepared))
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def __call__(self, datas: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        """Bytes -> (normalised batch of the decoded ones, indexes of the ones the decoder rejected)."""
        decoded = self.decode(datas)
        failed = [i for i, image in enumerate(decoded) if image is None]
        good = [image for image in decoded if image is not None]
        if not good:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.float32, device=self.device), failed
        return self.normalise(self.resize_crop(good)), failed

