"""omni_kernels: Triton and CUDA C++ kernels for Qwen2.5-Omni, each beside its plain torch reference.

Every op takes ``backend=None|"torch"|"triton"|"cuda"`` (see :mod:`omni_kernels._backend`).
"""

from omni_kernels._backend import available, registered, resolve
from omni_kernels.store_kv_cache import store_kv_cache, store_kv_cache_ref

__all__ = ["available", "registered", "resolve", "store_kv_cache", "store_kv_cache_ref"]
