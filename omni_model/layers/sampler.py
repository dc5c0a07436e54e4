"""Token sampling for the Thinker and the Talker: per-request settings mixed in one batch, no host sync.

HF's order (transformers 4.57.6 ``generate``): repetition penalty over every id already in the sequence (prompt
included), token suppression, then for sampling temperature, top-k and top-p; greedy takes the argmax after the
penalty. We add a logits mask of allowed ids (the Talker may only emit codes that the DiT's code table has, plus its
stop ids), so nothing outside the table can ever be sampled.

Every row carries its own settings (:class:`SamplingRows`: one small upload per step). Sampling is an inverse-CDF
draw with one uniform number per row, made on the host by :func:`counter_uniforms` from the request's seed and the
index of the token being drawn (a counter-based generator: SplitMix64 output ``n`` of the seed's key). So a seeded
request draws the same numbers whatever runs beside it and whenever it joins, and nothing on the device needs
``torch.multinomial`` (which reads its input back to check it) or any other host read.

Shapes: logits (B, V) float32; ``seen`` (B, V) bool: which ids occurred in each row so far; ``allowed`` (V,) bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings for one decoder (HF's names)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


# ------------------------------------------------------------------------------------------ random numbers

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # its finaliser's multipliers
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
THINKER_STREAM, TALKER_STREAM = 0, 1


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def counter_uniforms(seeds: Sequence[int], counters: Sequence[int], stream: int) -> np.ndarray:
    """One uniform number in (0, 1] per row: output ``counters[i]`` of SplitMix64 keyed by ``(seeds[i], stream)``
    (numpy uint64 arithmetic wraps, as the generator's definition does). Pure function of its arguments."""
    with np.errstate(over="ignore"):
        seed = np.asarray(seeds, dtype=np.uint64)
        key = _mix64(seed * np.uint64(2) + np.uint64(stream))
        z = _mix64(key + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 1.0) / float(1 << 53)


# ------------------------------------------------------------------------------------------ batched rows


@dataclass
class SamplingRows:
    """The settings of the B rows of one step, on the device: ``table`` (B, 6) float32 with columns do_sample,
    temperature, top_k (V for none), top_p (1 for none), repetition penalty, uniform; plus host flags that let a
    step skip the work no row needs."""

    table: torch.Tensor
    any_sample: bool
    any_penalty: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], uniforms: Sequence[float], vocab: int,
              device: torch.device) -> SamplingRows:
        rows = torch.tensor([[float(p.do_sample), float(p.temperature), float(min(p.top_k or vocab, vocab)),
                              float(1.0 if p.top_p is None else p.top_p), float(p.repetition_penalty), float(u)]
                             for p, u in zip(params, uniforms)], dtype=torch.float32)
        if device.type == "cuda":
            rows = rows.pin_memory()
        return cls(rows.to(device, non_blocking=True), any(p.do_sample for p in params),
                   any(p.repetition_penalty != 1.0 for p in params))

    def column(self, i: int) -> torch.Tensor:
        return self.table[:, i : i + 1]


def _penalized(logits: torch.Tensor, rows: SamplingRows, seen: torch.Tensor | None,
               allowed: torch.Tensor | None) -> torch.Tensor:
    """HF's repetition penalty (seen ids' logits divided by the penalty when positive, multiplied when negative),
    then the allowed-ids mask."""
    scores = logits.float()
    if seen is not None and rows.any_penalty:
        penalty = rows.column(4)
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _warped_sorted(scores: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p (HF's TopK and TopP warpers) in ascending sorted order: (scores, their ids)."""
    vocab = scores.shape[-1]
    ordered, ids = (scores / rows.column(1)).sort(dim=-1)
    kth_index = (vocab - rows.column(2).long()).clamp(0, vocab - 1)
    ordered = ordered.masked_fill(ordered < ordered.gather(1, kth_index), float("-inf"))
    cum = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - rows.column(3)
    drop[:, -1] = False  # the most likely id always stays
    return ordered.masked_fill(drop, float("-inf")), ids


def process_logits(logits: torch.Tensor, rows: SamplingRows, *, seen: torch.Tensor | None = None,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The processed scores (B, V) in vocabulary order that :func:`sample` draws from (sampling rows) or takes the
    argmax of (greedy rows), equal to HF's logits processors."""
    scores = _penalized(logits, rows, seen, allowed)
    if not rows.any_sample:
        return scores
    ordered, ids = _warped_sorted(scores, rows)
    warped = torch.empty_like(scores).scatter_(1, ids, ordered)
    return torch.where(rows.column(0) > 0, warped, scores)


def sample(logits: torch.Tensor, rows: SamplingRows, *, seen: torch.Tensor | None = None,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids (B,) int64: the argmax of the penalised scores for greedy rows, an inverse-CDF draw with the row's
    uniform for sampling rows. No host sync, no data-dependent shape."""
    scores = _penalized(logits, rows, seen, allowed)
    greedy = scores.argmax(dim=-1)
    if not rows.any_sample:
        return greedy
    ordered, ids = _warped_sorted(scores, rows)
    cdf = ordered.softmax(dim=-1).cumsum(dim=-1)
    target = rows.column(5) * cdf[:, -1:]  # u in (0, 1]: never lands on a zero-probability id
    pick = torch.searchsorted(cdf, target).clamp_(max=scores.shape[-1] - 1)
    drawn = ids.gather(1, pick).squeeze(1)
    return torch.where(rows.table[:, 0] > 0, drawn, greedy)


def mark_seen(seen: torch.Tensor, ids: torch.Tensor) -> None:
    """Records ids (B,) or (B, L) in the (B, V) ``seen`` mask, in place."""
    seen.scatter_(1, ids.view(ids.shape[0], -1), True)
