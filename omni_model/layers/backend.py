"""The one backend setting that every model module reads when it calls an ``omni_kernels`` op.

Model files call ops as ``op(..., backend=get_backend())``; nothing in ``omni_model/models`` chooses a backend
itself. ``OmniModel`` wraps each of its public calls in ``use_backend(self.backend)`` so that two models with
different backends can live in one process. ``None`` means each op's own default (the fastest available for the
device; ``OMNI_BACKEND`` overrides it, see ``omni_kernels._backend``).

The setting is a :class:`contextvars.ContextVar`, so threads and asyncio tasks each see their own value.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

BACKEND_NAMES = ("torch", "triton", "cuda")

_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("omni_backend", default=None)


def normalize_backend(name: str | None) -> str | None:
    """``"auto"`` and None -> None; ``"torch"|"triton"|"cuda"`` unchanged; anything else is a ValueError."""
    if name is None or name == "auto":
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto', None or one of {BACKEND_NAMES}; got {name!r}")
    return name


def get_backend() -> str | None:
    """The backend model code passes to every op call (None: the op's default)."""
    return _backend.get()


def set_backend(name: str | None) -> None:
    """Sets the backend for the current context (prefer :func:`use_backend`, which restores it)."""
    _backend.set(normalize_backend(name))


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Runs the body with ``name`` as the backend of every op call, then restores the previous setting."""
    token = _backend.set(normalize_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)
