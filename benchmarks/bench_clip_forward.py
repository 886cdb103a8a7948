"""Bare open_clip image-tower forward rate, fp32 against bf16 autocast.

This is the measurement behind `ClipDescriptor`'s CPU precision rule: bf16 is
only worth choosing where it beats fp32 on the machine at hand. Weights are
randomly initialised (`pretrained=None`): speed does not depend on their values
and none can be downloaded here.

    python benchmarks/bench_clip_forward.py --device cpu --batch-size 32 --batches 3

Prints one JSON line: the machine's CPU flags that matter for bf16, then
images/s per precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import open_clip
import torch

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_flags() -> dict[str, object]:
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "threads": torch.get_num_threads(),
    }


def _precision_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_images_per_second(
    model: torch.nn.Module, device: torch.device, precision: str, batch_size: int, batches: int, image_size: int
) -> float:
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=device)
    with torch.inference_mode(), _precision_context(device, precision):
        model.encode_image(pixels)  # warm-up: kernel selection and allocator growth stay out of the timing
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            model.encode_image(pixels)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return batch_size * batches / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None, device=device).eval()
    image_size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    rates = {
        precision: round(
            measure_images_per_second(model, device, precision, args.batch_size, args.batches, image_size), 2
        )
        for precision in args.precisions.split(",")
    }
    result = {
        "benchmark": "clip_forward",
        "model": args.model,
        "device": str(device),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "images_per_s": rates,
    }
    if device.type == "cpu":
        result["cpu"] = _cpu_flags()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
