"""Benchmarks (installed as ``omni_benchmarks``): one module per op plus end-to-end ones.

Each module defines its rows once, ``case_groups(device: str, quick: bool, preset: str) -> list[CaseGroup]``
(``cases.py``), and exposes ``run(device, quick, preset) -> list[Record]``, which times them; ``omni bench`` runs the
modules of a suite and writes the contract's JSON records, and ``pytest benchmarks`` (``conftest.py``) collects the
same rows as pytest-benchmark tests (docs/benchmarks.md). Modules listed here but not importable (an op that has not
landed) are reported as missing by the CLI, never silently skipped.
"""

SUITES: dict[str, tuple[str, ...]] = {
    "kernels": ("bench_store_kv_cache", "bench_sliding_block_attention", "bench_anti_aliased_snake",
                "bench_window_attention", "bench_apply_tmrope",
                "bench_paged_decode_attention", "bench_add_rms_norm", "bench_silu_and_mul",
                "bench_w4a16_linear"),
    "model": ("bench_rope_index", "bench_token2wav", "bench_thinker", "bench_talker", "bench_vision_encoder"),
    "e2e": ("bench_pipeline", "bench_serving"),
}
