"""omni_kernels: Triton and CUDA C++ kernels for Qwen2.5-Omni, each beside its plain torch reference.

Every op takes ``backend=None|"torch"|"triton"|"cuda"`` (see :mod:`omni_kernels._backend`).
"""

from omni_kernels._backend import available, registered, resolve
from omni_kernels.add_rms_norm import add_rms_norm, add_rms_norm_ref
from omni_kernels.anti_aliased_snake import anti_aliased_snake, anti_aliased_snake_ref
from omni_kernels.apply_tmrope import apply_tmrope, apply_tmrope_ref
from omni_kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from omni_kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from omni_kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from omni_kernels.sliding_block_attention import sliding_block_attention, sliding_block_attention_ref
from omni_kernels.store_kv_cache import store_kv_cache, store_kv_cache_ref
from omni_kernels.tmrope_store_kv import tmrope_store_kv, tmrope_store_kv_ref
from omni_kernels.w4a16_linear import w4a16_linear, w4a16_linear_ref
from omni_kernels.window_attention import window_attention, window_attention_ref

__all__ = ["available", "registered", "resolve", "store_kv_cache", "store_kv_cache_ref",
           "sliding_block_attention", "sliding_block_attention_ref", "anti_aliased_snake",
           "anti_aliased_snake_ref",
           "apply_tmrope", "apply_tmrope_ref", "tmrope_store_kv", "tmrope_store_kv_ref",
           "window_attention", "window_attention_ref",
           "paged_decode_attention", "paged_decode_attention_ref", "paged_prefill_attention",
           "paged_prefill_attention_ref", "add_rms_norm", "add_rms_norm_ref", "silu_and_mul",
           "silu_and_mul_ref", "w4a16_linear", "w4a16_linear_ref"]
