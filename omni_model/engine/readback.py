"""Sampled ids on their way to the host, read one step late so that no step waits for the GPU.

Each decoder step leaves its sampled ids on the device, where the next step feeds them (``last_token`` /
``last_code`` of the request's slot), and starts a copy of them to the host: on CUDA a non-blocking copy into
pinned memory and an event. The engine reads a step's ids only after it has launched the next step, so the GPU
never idles while the host decides what comes next, and the host never waits for a kernel it has just queued. The
price: a request whose read-back id ends it (a stop id) has run one step too many; that step's sample is dropped and
its reply element removed (see the engine).
"""

from __future__ import annotations

import torch


class Readback:
    """The ids (B,) one step sampled for ``rows`` (whatever the caller needs to route them: (request, track))."""

    def __init__(self, rows: list, ids: torch.Tensor, step: int):
        self.rows = rows
        self.step = step
        self.event = None
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = ids

    def values(self) -> list[int]:
        """The ids, waiting for their copy if it is still running."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
