"""Crop windows of a stored perceptual vector: does image A contain image B?

A large crop B of a photo A (50-75 % of its area) shares almost nothing with
A's global descriptor, but B's whole view is, up to resampling, a *window* of
A's whole view. The DCT of a window is a linear map of the DCT of the picture,
so the window's descriptor is rebuilt from A's stored vector alone (no pixels,
nothing more stored): the stored values are decompressed (square, undo the
frequency weight; the unknown overall scale does not matter), every window
coefficient is `R_y @ C @ R_x^T` with one small matrix per axis, and the result
is weighted, compressed and normalised like a stored vector.

Only the first half of the vector (the whole view, squashed to a square) is
used: the central-square half depends on the pixel aspect of the window, which
the vector does not hold. Scores are cosines of whole halves, in [-1, 1].

`coarse_windows` are the few windows a proposal search indexes;
`containment` is the fine score of proposed pairs: the best window of a dense
grid (scale, position, aspect) around every coarse window, then refined locally.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dedup.descriptors.perceptual import (
    COEFFICIENT_POWER,
    COEFFICIENTS,
    DIM,
    FREQUENCY_EXPONENT,
    GRID,
    VIEW_DIM,
    dct_matrix,
)

_U = np.array([u for u, _ in COEFFICIENTS])
_V = np.array([v for _, v in COEFFICIENTS])
BLOCK = int(max(_U.max(), _V.max())) + 1
_FLAT = _U * BLOCK + _V  # index of each kept coefficient in a flattened block
_WEIGHT = (np.maximum(np.hypot(_U, _V), 1.0) ** FREQUENCY_EXPONENT).astype(np.float32)
_DCT32 = dct_matrix(GRID, BLOCK).astype(np.float32)  # (BLOCK, GRID)


def whole_halves(vectors: np.ndarray) -> np.ndarray:
    """(n, 256) stored vectors -> (n, 128) unit whole-view halves (zero rows stay zero)."""
    half = np.asarray(vectors, dtype=np.float32)[:, :VIEW_DIM]
    norm = np.linalg.norm(half, axis=1, keepdims=True)
    return half / np.maximum(norm, 1e-12)


def coefficient_blocks(vectors: np.ndarray) -> np.ndarray:
    """(n, 256) stored vectors -> (n, BLOCK, BLOCK) DCT coefficients of the whole view, up to scale."""
    half = np.asarray(vectors, dtype=np.float32)[:, :VIEW_DIM]
    blocks = np.zeros((len(half), BLOCK, BLOCK), dtype=np.float32)
    # The stored value is sign(w) |w|^p with w = weight * coefficient: invert both.
    blocks[:, _U, _V] = np.sign(half) * np.abs(half) ** (1.0 / COEFFICIENT_POWER) / _WEIGHT
    return blocks


def axis_maps(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(k,) window starts and lengths (fractions of the side) -> (k, BLOCK, BLOCK) frequency maps.

    map[i, f, u]: the window's DCT frequency f from the picture's frequency u.
    The window is area-resized to GRID samples: each sample averages a cell of
    the picture, so each picture cosine is averaged over its cell (a sinc factor).
    """
    starts, lengths = np.asarray(starts, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    cell = lengths  # picture pixels (of the GRID-wide view) per window sample: length * GRID / GRID
    # Centre of window sample j, in picture-grid pixel coordinates.
    centres = starts[:, None] * GRID + (np.arange(GRID)[None, :] + 0.5) * cell[:, None] - 0.5
    omega = np.pi * np.arange(BLOCK) / GRID  # cos(omega_u (x + 1/2)) is basis u
    phase = omega[None, None, :] * (centres[:, :, None] + 0.5)
    average = np.sinc(omega[None, None, :] * cell[:, None, None] / (2 * np.pi))
    norms = np.full(BLOCK, math.sqrt(2.0 / GRID))
    norms[0] = math.sqrt(1.0 / GRID)
    basis = (np.cos(phase) * average * norms).astype(np.float32)  # (k, GRID samples, BLOCK picture frequencies)
    return _DCT32 @ basis


# Window starts and lengths are snapped to 1/QUANT of the side for the fine search (the smallest refine step
# is about one such unit), so its axis maps come from one table computed once per process.
QUANT = 128


@functools.lru_cache(maxsize=1)
def _axis_table() -> np.ndarray:
    """(QUANT+1, QUANT+1, BLOCK, BLOCK): axis_maps of start s/QUANT and length l/QUANT (zeros where unused)."""
    table = np.zeros((QUANT + 1, QUANT + 1, BLOCK, BLOCK), dtype=np.float32)
    starts, lengths = np.meshgrid(np.arange(QUANT + 1), np.arange(QUANT + 1), indexing="ij")
    used = (lengths >= int(MIN_SIDE * QUANT) - 1) & (starts + lengths <= QUANT)
    table[used] = axis_maps(starts[used] / QUANT, lengths[used] / QUANT)
    return table


def snapped_axis_maps(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """axis_maps of windows snapped to the 1/QUANT grid, read from the table."""
    length = np.clip(np.rint(np.asarray(lengths) * QUANT).astype(np.int64), int(MIN_SIDE * QUANT) - 1, QUANT)
    start = np.clip(np.rint(np.asarray(starts) * QUANT).astype(np.int64), 0, QUANT - length)
    return _axis_table()[start, length]


def _compress(values: np.ndarray) -> np.ndarray:
    return np.sqrt(values) if COEFFICIENT_POWER == 0.5 else values**COEFFICIENT_POWER  # sqrt: ~3x faster than **


def _signatures(blocks: np.ndarray) -> np.ndarray:
    """(..., BLOCK, BLOCK) coefficients -> (..., 128) weighted, compressed, unit signatures (DC dropped)."""
    flat = blocks.reshape(*blocks.shape[:-2], BLOCK * BLOCK)
    weighted = np.take(flat, _FLAT, axis=-1) * _WEIGHT
    weighted[..., 0] = 0.0  # (0, 0) is the first coefficient: brightness
    compressed = np.copysign(_compress(np.abs(weighted)), weighted)
    norm = np.sqrt(np.einsum("...d,...d->...", compressed, compressed))[..., None]
    return compressed / np.maximum(norm, 1e-12)


def window_signatures(blocks: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(n, BLOCK, BLOCK) coefficients x (w, 4) windows (x0, y0, width, height) -> (n, w, 128) signatures."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 4)
    rows = axis_maps(windows[:, 1], windows[:, 3])  # vertical frequency u (first index)
    cols = axis_maps(windows[:, 0], windows[:, 2])
    coefficients = np.einsum("wfu,nuv,wgv->nwfg", rows, blocks, cols, optimize=True)
    return _signatures(coefficients)


def grid_windows(sizes: list[tuple[float, float]], positions: int) -> np.ndarray:
    """Windows of each (width, height) at `positions` x `positions` evenly spaced places inside the picture."""
    windows = []
    for width, height in sizes:
        for y in np.linspace(0.0, 1.0 - height, positions):
            for x in np.linspace(0.0, 1.0 - width, positions):
                windows.append((x, y, width, height))
    return np.array(windows, dtype=np.float64)


def truncate(signatures: np.ndarray, count: int) -> np.ndarray:
    """Signatures cut to their `count` lowest frequencies and renormalised (the coarse proposal vectors).

    A window's highest stored frequencies come from picture frequencies the vector does not hold, so
    the low ones agree best between a crop and the window it was cut from.
    """
    cut = np.ascontiguousarray(signatures[..., :count])
    return cut / np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)


def _window_scores(coefficients: np.ndarray, children: np.ndarray) -> np.ndarray:
    """(p, w, BLOCK, BLOCK) window coefficients, (p, 128) child halves -> (p, w) cosines of their signatures.

    The same numbers as `_signatures(coefficients) . child`, without the unit signatures: with the square-root
    compression a signature's squared norm is the sum of the weighted magnitudes, so one pass fewer over
    the largest array of the search.
    """
    flat = coefficients.reshape(*coefficients.shape[:-2], BLOCK * BLOCK)
    weighted = np.take(flat, _FLAT, axis=-1)
    weighted *= _WEIGHT
    magnitude = np.abs(weighted)
    magnitude[..., 0] = 0.0  # (0, 0) is the first coefficient: brightness
    compressed = _compress(magnitude)
    squared_norm = magnitude.sum(axis=-1) if COEFFICIENT_POWER == 0.5 else np.einsum("...d,...d->...", compressed, compressed)
    dot = np.einsum("pwd,pd->pw", np.copysign(compressed, weighted, out=compressed), children)
    return dot / np.maximum(np.sqrt(squared_norm), 1e-12)


def pair_window_scores(blocks: np.ndarray, children: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(p, BLOCK, BLOCK) parent coefficients, (p, 128) child halves, (p, w, 4) windows -> (p, w) cosines."""
    p, w = windows.shape[:2]
    flat = windows.reshape(-1, 4)
    rows = snapped_axis_maps(flat[:, 1], flat[:, 3]).reshape(p, w * BLOCK, BLOCK)
    cols = snapped_axis_maps(flat[:, 0], flat[:, 2]).reshape(p, w, BLOCK, BLOCK)
    left = (rows @ blocks).reshape(p, w, BLOCK, BLOCK)  # R_y C of all a pair's windows in one product
    return _window_scores(left @ cols.transpose(0, 1, 3, 2), children)  # (R_y C) R_x^T


def _clamped(windows: np.ndarray) -> np.ndarray:
    """Windows kept inside the picture, between MIN_SIDE and the whole side."""
    out = windows.copy()
    out[..., 2:] = np.clip(out[..., 2:], MIN_SIDE, 1.0)
    out[..., 0] = np.clip(out[..., 0], 0.0, 1.0 - out[..., 2])
    out[..., 1] = np.clip(out[..., 1], 0.0, 1.0 - out[..., 3])
    return out


# Steps of the local window search (fractions of the side), coarse to fine.
REFINE_STEPS = (0.06, 0.03, 0.015, 0.0075)
REFINE_ROUNDS = 2  # moves per step size
MIN_SIDE = 0.45
# A window keeps at least this share of the picture: a large crop (issue 12: 50-75 % of the area) is a copy,
# a small part of a photo (the benchmark's 20-40 % distractor crops, a face out of a group) is another picture.
MIN_AREA = 0.47
# Shift, move the far edge, move the near edge (x with width, y with height), grow or shrink about the centre.
# (No "stay" move: the current window's score is already the pair's best.)
_MOVES = np.array([
    [1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0, 0],
    [0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 1], [0, 0, 0, -1],
    [-1, 0, 1, 0], [1, 0, -1, 0], [0, -1, 0, 1], [0, 1, 0, -1],
    [-0.5, -0.5, 1, 1], [0.5, 0.5, -1, -1],
], dtype=np.float64)


def refine(blocks: np.ndarray, children: np.ndarray, start: np.ndarray,
           give_up: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hill-climb each pair's window (position, width, height) from `start` (p, 4); returns (scores, windows).

    A pattern search: every round tries each side moved in and out by the step and keeps the best;
    14 windows a round, so a pair costs ~110 windows instead of a dense grid of ~1,200. A pair still
    under `give_up[i]` after step i stops climbing (most proposals are hopeless, and cost the most).
    """
    current = _clamped(np.asarray(start, dtype=np.float64))
    best = pair_window_scores(blocks, children, current[:, None, :])[:, 0]
    active = np.arange(len(best))
    for level, step in enumerate(REFINE_STEPS):
        for _ in range(REFINE_ROUNDS):
            trial = _clamped(current[active, None, :] + step * _MOVES[None, :, :])
            scores = pair_window_scores(blocks[active], children[active], trial)
            scores[trial[..., 2] * trial[..., 3] < MIN_AREA] = -np.inf
            pick = scores.argmax(axis=1)
            top = scores[np.arange(len(pick)), pick]
            improved = top > best[active]
            current[active[improved]] = trial[improved, pick[improved]]
            best[active] = np.maximum(best[active], top)
        if give_up is not None:
            active = active[best[active] >= give_up[level]]
    return best, current


__all__ = ["BLOCK", "DIM", "axis_maps", "coefficient_blocks", "grid_windows", "whole_halves", "window_signatures"]
