"""Benchmark shapes taken from the real models (docs/model.md), shared by the bench scripts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVShape:
    name: str
    num_kv_heads: int
    head_dim: int


THINKER_7B = KVShape("thinker-7b", num_kv_heads=4, head_dim=128)
THINKER_3B = KVShape("thinker-3b", num_kv_heads=2, head_dim=128)
TALKER_7B = KVShape("talker-7b", num_kv_heads=4, head_dim=128)

KV_SHAPES = {"qwen2.5-omni-7b": (THINKER_7B, TALKER_7B), "qwen2.5-omni-3b": (THINKER_3B,)}

# Tokens written per call: one decode step at batch 1 and 64, and a 4k-token prefill chunk.
STORE_KV_TOKENS = (1, 64, 4096)
STORE_KV_TOKENS_QUICK = (1, 64)
PAGE_SIZE = 16
