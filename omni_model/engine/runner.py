"""Runs one paged decoder (the Thinker LM or the Talker) step by step: prefill and batched decode.

The runner owns the decoder's KV cache and block manager. Step metadata (slot mapping, block tables, context
lengths) is built on the host from the block manager's lists, staged in pinned memory and copied to the
device without a sync. On CUDA, decode steps replay CUDA graphs captured per batch-size bucket: the graph
reads static input buffers, so a step is a few small copies plus one replay.

The decoder is any module with ``forward(embeds (T, hidden), positions (3, T)) -> hidden (T, hidden)`` and
``paged_attention_layers() -> list[PagedAttention]``; the step's metadata reaches its attention layers through
:func:`omni_model.layers.context.attention_context`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from omni_model.engine.block_manager import BlockManager, CacheFullError, SeqBlocks
from omni_model.engine.graphs import capture
from omni_model.engine.kv_cache import KVCache
from omni_model.layers.context import AttentionMetadata, attention_context

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass
class RunnerConfig:
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 32768
    max_batch: int = 64
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    batch: int
    embeds: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    out: torch.Tensor = field(default=None)


class DecoderRunner:
    """Prefill and decode steps of one decoder over its own paged KV cache."""

    def __init__(self, decoder: nn.Module, config: RunnerConfig, *, dtype: torch.dtype, device: torch.device):
        self.decoder = decoder
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        layers = decoder.paged_attention_layers()
        self.cache = KVCache(layers, num_blocks=config.num_blocks, block_size=config.block_size, dtype=dtype,
                             device=self.device)
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self._graphs: dict[int, _Graph] = {}
        self._graph_pool = None
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------- sequences

    def allocate(self, token_ids: list[int], *, media_start: int | None = None, salt: bytes | None = None,
                 reuse_prefix: bool = True) -> SeqBlocks:
        """Blocks for a new prompt (raises :class:`CacheFullError` and changes nothing when it does not fit)."""
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_model_len "
                             f"{self.config.max_model_len}")
        return self.blocks.allocate(token_ids, media_start=media_start, salt=salt, reuse_prefix=reuse_prefix)

    def free(self, seq: SeqBlocks) -> None:
        self.blocks.free_seq(seq)

    # ---------------------------------------------------------------------------------------- metadata

    def _block_table(self, seqs: list[SeqBlocks], rows: int) -> torch.Tensor:
        width = self.max_blocks_per_seq if self.use_graphs else max(len(s.block_table) for s in seqs)
        table = torch.zeros(rows, width, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        return table

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def prefill_metadata(self, seqs: list[SeqBlocks], new_lens: list[int]) -> AttentionMetadata:
        """Each sequence's last ``new_lens[i]`` tokens are new (the rest is cached)."""
        pin = self.device.type == "cuda"
        p = self.config.block_size
        slots, cu, ctx = [], [0], []
        for s, n in zip(seqs, new_lens):
            start = s.num_tokens - n
            pos = torch.arange(start, s.num_tokens)
            table = torch.tensor(s.block_table, dtype=torch.int64)
            slots.append(table[pos // p] * p + pos % p)
            cu.append(cu[-1] + n)
            ctx.append(s.num_tokens)
        host = dict(
            slot_mapping=torch.cat(slots),
            cu=torch.tensor(cu, dtype=torch.int32),
            ctx=torch.tensor(ctx, dtype=torch.int32),
        )
        if pin:
            host = {k: v.pin_memory() for k, v in host.items()}
        return AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(host["slot_mapping"]),
            block_tables=self._to_device(self._block_table(seqs, len(seqs))),
            context_lens=self._to_device(host["ctx"]),
            cu_seqlens_q=self._to_device(host["cu"]),
            max_seqlen_q=max(new_lens),
        )

    def _decode_host(self, seqs: list[SeqBlocks], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pin = self.device.type == "cuda"
        slots = torch.full((rows,), -1, dtype=torch.int64)
        ctx = torch.zeros(rows, dtype=torch.int32)
        for i, s in enumerate(seqs):
            slots[i] = self.blocks.slot(s, s.num_tokens - 1)
            ctx[i] = s.num_tokens
        if pin:
            slots, ctx = slots.pin_memory(), ctx.pin_memory()
        return slots, ctx, self._block_table(seqs, rows)

    # ---------------------------------------------------------------------------------------- steps

    @torch.inference_mode()
    def prefill(self, seqs: list[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor,
                new_lens: list[int] | None = None) -> torch.Tensor:
        """Runs the new tokens of ``seqs`` (packed embeds (T, hidden), positions (3, T)) -> hidden (T, hidden)."""
        if new_lens is None:
            new_lens = [s.num_tokens - s.num_cached_tokens for s in seqs]
        if sum(new_lens) != embeds.shape[0]:
            raise ValueError(f"embeds has {embeds.shape[0]} rows, the sequences have {sum(new_lens)} new tokens")
        meta = self.prefill_metadata(seqs, new_lens)
        with attention_context(meta):
            return self.decoder(embeds, positions)

    def reserve_decode(self, seqs: list[SeqBlocks]) -> list[int]:
        """Makes room for one more token in each sequence; returns the indices that did not fit (their
        requests must fail; the others go on)."""
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

    @torch.inference_mode()
    def decode(self, seqs: list[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence, already reserved with :meth:`reserve_decode`: embeds (B, hidden), positions
        (3, B) -> hidden (B, hidden)."""
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
                self.blocks.check_invariants()
        slots, ctx, table = self._decode_host(seqs, batch)
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self._to_device(slots),
            block_tables=self._to_device(table),
            context_lens=self._to_device(ctx),
            cu_seqlens_q=None,
            max_seqlen_q=1,
        )
        with attention_context(meta):
            return self.decoder(embeds, positions)

    # ---------------------------------------------------------------------------------------- CUDA graphs

    def _bucket(self, batch: int) -> int:
        for b in GRAPH_BATCH_SIZES:
            if b >= batch and b <= self.config.max_batch:
                return b
        return self.config.max_batch

    def _capture(self, bucket: int, hidden: int) -> _Graph:
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=torch.full((bucket,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(bucket, dtype=torch.int32, device=dev),
            cu_seqlens_q=None,
            max_seqlen_q=1,
        )
        g = _Graph(None, bucket, torch.zeros(bucket, hidden, dtype=self.dtype, device=dev),
                   torch.zeros(3, bucket, dtype=torch.int64, device=dev), meta)
        with attention_context(meta):
            g.graph, g.out = capture(lambda: self.decoder(g.embeds, g.positions), dev, self._graph_pool, warmup=2)
        if self._graph_pool is None:
            self._graph_pool = g.graph.pool()
        return g

    def _decode_graph(self, seqs: list[SeqBlocks], embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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
