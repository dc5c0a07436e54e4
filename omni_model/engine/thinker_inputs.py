"""The Thinker's inputs for a prefill chunk: prompt embeddings with the encoders' features in place, then the
embeddings of reply tokens a resumed request recomputes.

The encoders run once per media item of a request, when the first chunk that needs the item is prepared: items
whose placeholder tokens all lie in the cached prefix (a conversation's earlier turn) are never encoded again.
"""

from __future__ import annotations

import torch

from omni_model.engine.request import Request
from omni_model.engine.runner import to_device
from omni_model.models.thinker import Thinker


def encode_media(thinker: Thinker, req: Request, start: int, device: torch.device) -> bool:
    """Fills ``req.embeds`` (L, E) from the token embeddings and, for every media item with a token at or after
    ``start`` that is not encoded yet, its encoder's features. Returns whether an encoder ran."""
    if req.embeds is None:
        req.embeds = thinker.model.embed_tokens(to_device(req.prompt_ids, device))
    todo = [m for m in req.media if (m.kind, m.index) not in req.encoded and m.end > start]
    if not todo:
        return False
    p = req.prompt
    embeds = req.embeds
    for kind, encoder in (("audio", thinker.audio_tower), ("image", thinker.visual), ("video", thinker.visual)):
        items = [m for m in todo if m.kind == kind]
        if not items:
            continue
        if kind == "audio":
            features, lens = p.audio
            media = (features[[m.index for m in items]], [lens[m.index] for m in items])
        else:
            pixels, grids = p.images if kind == "image" else p.videos
            rows = [t * h * w for t, h, w in grids]
            offsets = [sum(rows[:k]) for k in range(len(rows))]
            media = (torch.cat([pixels[offsets[m.index]:offsets[m.index] + rows[m.index]] for m in items]),
                     [grids[m.index] for m in items])
        features = encoder(media[0].to(device=device, dtype=embeds.dtype), media[1]).to(embeds.dtype)
        where = to_device([i for m in items for i in m.token_positions], device)
        embeds = embeds.index_copy(0, where, features)
        for m in items:
            req.encoded.add((m.kind, m.index))
    req.embeds = embeds
    return True


def chunk_inputs(thinker: Thinker, req: Request, start: int, n: int, device: torch.device) -> torch.Tensor:
    """Embeddings (n, E) of positions [start, start + n): the prompt's, then those of read-back reply tokens."""
    length = req.num_prompt_tokens
    parts = []
    if start < length:
        parts.append(req.embeds[start:min(start + n, length)])
    if start + n > length:
        tokens = req.thinker.samples[max(start, length) - length:start + n - length]
        parts.append(thinker.model.embed_tokens(to_device(tokens, device)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
