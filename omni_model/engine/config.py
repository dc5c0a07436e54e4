"""``EngineConfig``: how many requests run at once, how much a step may compute, and how big the KV caches are."""

from __future__ import annotations

from dataclasses import dataclass

from omni_model.engine.runner import GRAPH_BATCH_SIZES

# Share of the device memory left free after the weights that the KV caches take by default. The rest serves the
# activations of the largest step (a prefill chunk of max_num_batched_tokens, the Token2Wav chunk batch, the
# vision encoder on a long video) and the CUDA graph pools; the same default as before the engine existed.
DEFAULT_KV_CACHE_MEMORY_FRACTION = 0.35
# Without a device memory figure (CPU), each decoder's cache holds this many tokens unless kv_cache_tokens says
# otherwise: a 2 s spoken question plus an image is ~100 prompt tokens on the tiny model, a minute of speech 3000
# codes, so this serves a few concurrent conversations.
CPU_KV_CACHE_TOKENS = 16384


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and caches (checked on construction; every error names the field).

    * ``max_num_seqs``: requests running at once (the rest wait); also the largest decode batch with a CUDA graph.
    * ``max_num_batched_tokens``: tokens one decoder computes in one step: its decodes first, then prefill chunks of
      waiting or prefilling requests fill the rest (so a long prompt delays the running voices by one step of this
      size at most). At least ``max_num_seqs``, so that a full decode batch always leaves room to prefill.
    * ``kv_cache_tokens``: tokens each decoder's KV cache holds (the Thinker's and the Talker's alike); None: size
      both from ``kv_cache_memory_fraction`` of the free device memory after the weights, split so that each holds
      the same number of tokens (in proportion to their bytes per token), or :data:`CPU_KV_CACHE_TOKENS` on CPU.
    * ``block_size``: tokens per cache block; ``enable_prefix_caching``: share equal prompt prefixes (a conversation's
      earlier turns, media included) between requests.
    * ``cuda_graphs`` and ``cuda_graph_batch_sizes``: decode steps replay CUDA graphs captured for these batch
      buckets (those up to ``max_num_seqs``) when the engine starts.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    kv_cache_tokens: int | None = None
    kv_cache_memory_fraction: float = DEFAULT_KV_CACHE_MEMORY_FRACTION
    block_size: int = 16
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES

    def __post_init__(self):
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            positive_int(name)
        if self.kv_cache_tokens is not None:
            positive_int("kv_cache_tokens")
            if self.kv_cache_tokens < self.block_size:
                raise ValueError(f"EngineConfig.kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one "
                                 f"block of block_size {self.block_size} tokens")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): a full decode batch must leave room to prefill")
        fraction = self.kv_cache_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise ValueError(f"EngineConfig.kv_cache_memory_fraction must lie in (0, 1), got {fraction!r}")
        for name in ("enable_prefix_caching", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        sizes = self.cuda_graph_batch_sizes
        if (not isinstance(sizes, tuple) or not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                              for b in sizes) or list(sizes) != sorted(set(sizes))):
            raise ValueError(f"EngineConfig.cuda_graph_batch_sizes must be a non-empty increasing tuple of positive "
                             f"ints, got {sizes!r}")
