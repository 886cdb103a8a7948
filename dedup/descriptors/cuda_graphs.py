"""Optional CUDA-graph replay of the clip image tower (`ClipDescriptor(cuda_graphs=True)`).

A ViT-B/32 forward is a few hundred small kernels; at small batch sizes their
launch cost can bound the GPU. A graph records them once per batch shape and
replays them in one launch. Off by default: whether it pays at the batch sizes
the pipeline uses has not been measured yet (benchmarks/bench_gpu_embed.py
reports both when run with --cuda-graphs on a GPU).
"""

from __future__ import annotations

import contextlib

import torch

_WARMUP_RUNS = 3  # side-stream runs before capture, as torch.cuda.graphs asks


def graph_batch_size(count: int, cap: int) -> int:
    """The captured batch size a batch of `count` replays: the next power of two, at most `cap`."""
    return min(cap, 1 << max(count - 1, 0).bit_length())


class GraphedEncoder:
    """`model.encode_image` replayed from one CUDA graph per input shape.

    Batches are zero-padded to the next power of two (at most `batch_size`,
    above which they are split), so short batches replay one of a few graphs
    instead of capturing one per size, and waste at most half a batch.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None,
                 batch_size: int) -> None:
        self.model, self.device, self.autocast_dtype = model, device, autocast_dtype
        self.batch_size = batch_size
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # The autocast weight cache cannot live across graph capture and replay.
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _capture(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = example.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode(), self._context():
            for _ in range(_WARMUP_RUNS):
                self.model.encode_image(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), self._context():
            static_out = self.model.encode_image(static_in)
        return graph, static_in, static_out

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > self.batch_size:
            return torch.cat([self(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])
        count = len(batch)
        padded_size = graph_batch_size(count, self.batch_size)
        if count < padded_size:
            pad = batch.new_zeros((padded_size - count, *batch.shape[1:]))
            batch = torch.cat([batch, pad]).contiguous(memory_format=_memory_format(batch))
        return self._replay(batch)[:count]

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        key = (tuple(batch.shape), batch.dtype, batch.is_contiguous(memory_format=torch.channels_last))
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch)
        graph, static_in, static_out = self._graphs[key]
        with torch.inference_mode():  # static_out is an inference tensor: read it where it was made
            static_in.copy_(batch)
            graph.replay()
            return static_out.clone()


def _memory_format(batch: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if batch.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
