"""Runs one paged decoder (the Thinker's LM or the Talker) step by step: prefill chunks and batched decode.

The runner owns the decoder's KV cache and block manager. Step metadata (slot mapping, block tables, context
lengths) is built on the host from the block manager's lists, staged in pinned memory and copied to the device
without a sync. On CUDA, decode steps replay CUDA graphs captured per batch-size bucket (:meth:`capture_graphs`,
called when the engine starts): the graph reads static input buffers, so a step is a few small copies plus one
replay.

The decoder is any module with ``forward(embeds (T, hidden), positions (3, T)) -> hidden (T, hidden)`` and
``paged_attention_layers() -> list[PagedAttention]``; the step's metadata and the cache reach its attention layers
through :func:`omni_model.layers.context.attention_context`. With ``store_hidden`` the final hidden state of every
token computed is also written to the cache's hidden store, at the token's slot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from omni_model.engine.block_manager import BlockManager, CacheFullError, SeqBlocks
from omni_model.engine.graphs import capture
from omni_model.engine.kv_cache import KVCache
from omni_model.layers.context import AttentionMetadata, attention_context

# Decode batch buckets that get a CUDA graph (a batch runs in the smallest bucket that holds it).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass
class RunnerConfig:
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 32768
    max_batch: int = 64  # the largest decode batch that replays a graph
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True
    graph_batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES
    store_hidden: bool = False


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    batch: int
    embeds: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    out: torch.Tensor = field(default=None)


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor staged for a non-blocking copy to ``device`` (page-locked when that is a GPU)."""
    return t.pin_memory() if device.type == "cuda" else t


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list or tensor on ``device`` without a sync: pinned staging and a non-blocking copy on CUDA."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return pinned(t, device).to(device, non_blocking=True)


class DecoderRunner:
    """Prefill and decode steps of one decoder over its own paged KV cache."""

    def __init__(self, decoder: nn.Module, config: RunnerConfig, *, dtype: torch.dtype, device: torch.device):
        self.decoder = decoder
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        layers = decoder.paged_attention_layers()
        hidden = decoder.hidden_size if config.store_hidden else 0
        self.cache = KVCache(num_layers=len(layers), num_kv_heads=layers[0].num_kv_heads, head_dim=layers[0].head_dim,
                             num_blocks=config.num_blocks, block_size=config.block_size, dtype=dtype,
                             device=self.device, hidden_size=hidden)
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self._graphs: dict[int, _Graph] = {}
        self._graph_pool = None
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------- sequences

    def allocate(self, num_tokens: int, hashes: Sequence[bytes] = (), *,
                 max_reuse_tokens: int | None = None) -> SeqBlocks:
        """Blocks for a new sequence (raises :class:`CacheFullError` and changes nothing when it does not fit)."""
        if num_tokens > self.config.max_model_len:
            raise ValueError(f"the sequence has {num_tokens} tokens, more than max_model_len "
                             f"{self.config.max_model_len}")
        return self.blocks.allocate(num_tokens, hashes, max_reuse_tokens=max_reuse_tokens)

    def free(self, seq: SeqBlocks) -> None:
        self.blocks.free_seq(seq)

    def reserve_decode(self, seqs: list[SeqBlocks]) -> list[int]:
        """Makes room for one more token in each sequence; returns the indices that did not fit (unchanged)."""
        failed = []
        for i, s in enumerate(seqs):
            if s.num_tokens + 1 > self.config.max_model_len:
                failed.append(i)
                continue
            try:
                self.blocks.append(s, 1)
            except CacheFullError:
                failed.append(i)
        return failed

    # ---------------------------------------------------------------------------------------- metadata

    def _block_table(self, seqs: Sequence[SeqBlocks], rows: int) -> torch.Tensor:
        width = self.max_blocks_per_seq if self.use_graphs else max(len(s.block_table) for s in seqs)
        table = torch.zeros(rows, width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        return pinned(table, self.device)

    def slots(self, seq: SeqBlocks, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of ``seq`` on the host: (end - start,) int64."""
        p = self.config.block_size
        pos = torch.arange(start, end)
        return torch.tensor(seq.block_table, dtype=torch.int64)[pos // p] * p + pos % p

    def prefill_metadata(self, seqs: Sequence[SeqBlocks], starts: Sequence[int],
                         new_lens: Sequence[int]) -> AttentionMetadata:
        """Sequence i computes positions [starts[i], starts[i] + new_lens[i]) over its cached context before them."""
        cu = [0]
        for n in new_lens:
            cu.append(cu[-1] + n)
        slots = torch.cat([self.slots(s, a, a + n) for s, a, n in zip(seqs, starts, new_lens)])
        ctx = torch.tensor([a + n for a, n in zip(starts, new_lens)], dtype=torch.int32)
        return AttentionMetadata(
            is_prefill=True,
            kv_cache=self.cache,
            slot_mapping=to_device(slots, self.device),
            block_tables=to_device(self._block_table(seqs, len(seqs)), self.device),
            context_lens=to_device(ctx, self.device),
            cu_seqlens_q=to_device(torch.tensor(cu, dtype=torch.int32), self.device),
            max_seqlen_q=max(new_lens),
        )

    def _decode_host(self, seqs: Sequence[SeqBlocks], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = torch.full((rows,), -1, dtype=torch.int64)
        ctx = torch.zeros(rows, dtype=torch.int32)
        for i, s in enumerate(seqs):
            slots[i] = self.blocks.slot(s, s.num_tokens - 1)
            ctx[i] = s.num_tokens
        return pinned(slots, self.device), pinned(ctx, self.device), self._block_table(seqs, rows)

    # ---------------------------------------------------------------------------------------- steps

    def _run(self, meta: AttentionMetadata, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with attention_context(meta):
            hidden = self.decoder(embeds, positions)
        self.cache.store_hidden(hidden, meta.slot_mapping)
        return hidden

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor,
                starts: Sequence[int] | None = None, new_lens: Sequence[int] | None = None) -> torch.Tensor:
        """Computes a chunk of each sequence: positions [starts[i], starts[i] + new_lens[i]) (default: everything
        after the cached prefix) from packed embeds (T, hidden) and positions (3, T) -> hidden (T, hidden)."""
        if starts is None:
            starts = [s.num_cached_tokens for s in seqs]
        if new_lens is None:
            new_lens = [s.num_tokens - a for s, a in zip(seqs, starts)]
        if sum(new_lens) != embeds.shape[0]:
            raise ValueError(f"embeds has {embeds.shape[0]} rows, the chunks have {sum(new_lens)} tokens")
        for s, a, n in zip(seqs, starts, new_lens):
            if n <= 0 or a < 0 or a + n > s.num_tokens:
                raise ValueError(f"chunk [{a}, {a + n}) lies outside the sequence's {s.num_tokens} reserved tokens")
        return self._run(self.prefill_metadata(seqs, starts, new_lens), embeds, positions)

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence at its last reserved position (see :meth:`reserve_decode`): embeds (B, hidden),
        positions (3, B) -> hidden (B, hidden)."""
        batch = len(seqs)
        if self.use_graphs and batch <= self.config.max_batch:
            try:
                return self._decode_graph(seqs, embeds, positions)
            except torch.cuda.CudaError:
                raise
            except RuntimeError as exc:  # a capture the decoder does not support: say so, then run eagerly
                warnings.warn(f"CUDA graph capture failed ({exc}); decoding without CUDA graphs", stacklevel=2)
                self.use_graphs = False
                self._graphs.clear()
        slots, ctx, table = self._decode_host(seqs, batch)
        meta = AttentionMetadata(
            is_prefill=False,
            kv_cache=self.cache,
            slot_mapping=to_device(slots, self.device),
            block_tables=to_device(table, self.device),
            context_lens=to_device(ctx, self.device),
            max_seqlen_q=1,
        )
        return self._run(meta, embeds, positions)

    # ---------------------------------------------------------------------------------------- CUDA graphs

    def _bucket(self, batch: int) -> int:
        for b in self.config.graph_batch_sizes:
            if batch <= b <= self.config.max_batch:
                return b
        return self.config.max_batch

    def capture_graphs(self, hidden_size: int) -> int:
        """Captures the decode graph of every bucket up to ``max_batch`` now (engine start); returns how many."""
        if not self.use_graphs:
            return 0
        for bucket in sorted({self._bucket(b) for b in range(1, self.config.max_batch + 1)}):
            if bucket not in self._graphs:
                try:
                    self._graphs[bucket] = self._capture(bucket, hidden_size)
                except torch.cuda.CudaError:
                    raise
                except RuntimeError as exc:
                    warnings.warn(f"CUDA graph capture failed ({exc}); decoding without CUDA graphs", stacklevel=2)
                    self.use_graphs = False
                    self._graphs.clear()
                    return 0
        return len(self._graphs)

    def _capture(self, bucket: int, hidden: int) -> _Graph:
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=False,
            kv_cache=self.cache,
            slot_mapping=torch.full((bucket,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(bucket, dtype=torch.int32, device=dev),
            max_seqlen_q=1,
        )
        g = _Graph(None, bucket, torch.zeros(bucket, hidden, dtype=self.dtype, device=dev),
                   torch.zeros(3, bucket, dtype=torch.int64, device=dev), meta)
        g.graph, g.out = capture(lambda: self._run(meta, g.embeds, g.positions), dev, self._graph_pool, warmup=2)
        if self._graph_pool is None:
            self._graph_pool = g.graph.pool()
        return g

    def _decode_graph(self, seqs: Sequence[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = len(seqs)
        bucket = self._bucket(batch)
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = self._capture(bucket, embeds.shape[-1])
        slots, ctx, table = self._decode_host(seqs, bucket)
        g.meta.slot_mapping.copy_(slots, non_blocking=True)
        g.meta.context_lens.copy_(ctx, non_blocking=True)
        g.meta.block_tables.copy_(table, non_blocking=True)
        g.embeds[:batch].copy_(embeds)
        g.positions[:, :batch].copy_(positions)
        g.graph.replay()
        return g.out[:batch]
