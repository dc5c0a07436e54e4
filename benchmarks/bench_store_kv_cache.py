"""store_kv_cache: write new keys and values into the paged cache (GB/s of bytes moved).

Providers: torch (the reference, index_put), torch.compile of it, triton, cuda. No outside peer is named for
this op; the copy bandwidth measured in the same run is the roofline.
"""

from __future__ import annotations

import torch

from omni_benchmarks.shapes import KV_SHAPES, PAGE_SIZE, STORE_KV_TOKENS, STORE_KV_TOKENS_QUICK
from omni_kernels import available, store_kv_cache, store_kv_cache_ref
from omni_kernels.testing import Record, bench_main, do_bench, make_record, set_speedups


def _providers(dev, k, v, k_cache, v_cache, slots, compiled) -> dict:
    providers = {
        "torch": lambda: store_kv_cache_ref(k, v, k_cache, v_cache, slots),
        "torch.compile": lambda: compiled(k, v, k_cache, v_cache, slots),
    }
    for backend in available("store_kv_cache", dev):
        if backend != "torch":
            providers[backend] = lambda b=backend: store_kv_cache(k, v, k_cache, v_cache, slots, backend=b)
    return providers


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    records = []
    compiled = torch.compile(store_kv_cache_ref)
    for shape in KV_SHAPES[preset]:
        for num_tokens in STORE_KV_TOKENS_QUICK if quick else STORE_KV_TOKENS:
            num_blocks = max(64, 4 * num_tokens // PAGE_SIZE)
            k = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            k_cache = torch.zeros(num_blocks, PAGE_SIZE, shape.num_kv_heads, shape.head_dim, device=dev, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            slots = torch.randperm(num_blocks * PAGE_SIZE, device=dev)[:num_tokens]
            nbytes = 4 * k.numel() * k.element_size() + slots.numel() * slots.element_size()
            label = f"{shape.name} T={num_tokens} Hk={shape.num_kv_heads} D={shape.head_dim} P={PAGE_SIZE}"
            for name, fn in _providers(dev, k, v, k_cache, v_cache, slots, compiled).items():
                timing = do_bench(fn, device=dev, rep=20 if quick else 100)
                records.append(make_record(bench="store_kv_cache", provider=name, shape=label, dtype=dtype,
                                           device=dev, timing=timing, nbytes=nbytes))
    return set_speedups(records, "torch")


if __name__ == "__main__":
    bench_main(run, __doc__)
