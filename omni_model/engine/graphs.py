"""CUDA graphs for fixed-shape steps: capture once per shape, then replay with new inputs copied in.

Used by the decode runner (one graph per batch bucket) and by streaming Token2Wav (the DiT's whole flow-matching
solve of a chunk window, and the vocoder of a chunk: 36 DiT passes of ~20 small kernels each per layer, which
launch overhead dominates without a graph).

A captured step reads its inputs from static buffers and writes its output into memory the graph owns: the next
replay overwrites it. Anything the step reads that is not an input (weights, cached constants) must keep its address
between replays; constants made on first use (a host-to-device copy, which a capture cannot contain) are made by
the warm-up run that precedes every capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch


def capture(fn: Callable[[], object], device: torch.device, pool=None, warmup: int = 1):
    """Runs ``fn`` ``warmup`` times on a side stream (lazy initialisation, Triton compilation and autotuning, cached
    constants), then captures one call. Returns (graph, the captured call's output)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class GraphCache:
    """Replays ``fn(*inputs) -> Tensor`` from CUDA graphs, one per (key, input shapes and dtypes).

    ``key`` must name everything besides the inputs' shapes and dtypes that changes what ``fn`` computes (Python
    numbers it bakes in, the kernel backend, the precision). All graphs share one memory pool. A capture that fails
    (an operation a graph cannot hold) is reported once and the cache runs everything eagerly from then on.
    """

    def __init__(self, device: torch.device | str, *, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self._entries: dict[Hashable, _Entry] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                 capture_new: bool = True) -> torch.Tensor:
        """``fn(*inputs)``: replayed when a graph of this key and shapes exists, captured first when
        ``capture_new`` (a shape that will come back), else run eagerly. The result is the caller's own tensor."""
        if not self.enabled:
            return fn(*inputs)
        full_key = (key, tuple((tuple(t.shape), t.dtype) for t in inputs))
        entry = self._entries.get(full_key)
        if entry is None:
            if not capture_new:
                return fn(*inputs)
            entry = self._capture(full_key, fn, inputs)
            if entry is None:
                return fn(*inputs)
        for buffer, value in zip(entry.inputs, inputs):
            buffer.copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, full_key: Hashable, fn: Callable[..., torch.Tensor], inputs) -> _Entry | None:
        with torch.inference_mode(False):  # normal tensors: copied into both inside and outside inference mode
            static = [t.detach().clone() for t in inputs]
        try:
            graph, output = capture(lambda: fn(*static), self.device, self._pool)
        except torch.cuda.CudaError:
            raise
        except RuntimeError as exc:
            warnings.warn(f"CUDA graph capture failed ({exc}); running without CUDA graphs", stacklevel=3)
            self.enabled = False
            self._entries.clear()
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = self._entries[full_key] = _Entry(graph, static, output)
        return entry
