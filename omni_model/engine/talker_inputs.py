"""The Talker's inputs: its prompt, built from the Thinker's states, and the input of each code step.

* Prompt (L + 2 positions): per prompt position the Thinker's final hidden state plus its input embedding (media
  positions: the hidden state only, as HF zeroes their embedding), then the speaker's bos embedding and the first
  reply element; the last two also get the codec pad and codec bos embeddings. The hidden states come from the
  Thinker's cache (its hidden store), so tokens served by the prefix cache have theirs too. Projected once when the
  Talker starts and kept: a preempted Talker recomputes its KV from it.
* Step j (j >= 1; it draws code j): the codec embedding of code j - 1 plus reply element j, projected. Reply element
  k is the Thinker's hidden state plus input embedding of reply token k, made when that token was fed; after the
  text: the text-end embedding once, then text-pad. Element k is used only once token k has been read back and did
  not end the reply (the last reply token is never spoken, as in HF).
"""

from __future__ import annotations

import torch

from omni_model.engine.request import Request
from omni_model.engine.runner import DecoderRunner, to_device
from omni_model.models.talker import Talker
from omni_model.models.thinker import Thinker


def element_ready(req: Request, j: int) -> bool:
    """Whether reply element ``j`` is known (its token read back and not the end of the reply, or the text over)."""
    t = req.thinker
    return t.done or (j < len(req.reply) and j < len(t.samples))


def reply_element(req: Request, j: int, text_end_pad: torch.Tensor) -> torch.Tensor:
    """Reply element ``j`` (E,) for Talker step j (see :func:`element_ready`); ``text_end_pad`` (2, E): the
    Thinker's embeddings of the text-end and text-pad ids."""
    if j < len(req.reply):
        return req.reply[j]
    return text_end_pad[0 if j == len(req.reply) else 1]


def prompt_inputs(thinker: Thinker, talker: Talker, req: Request, thinker_runner: DecoderRunner,
                  speaker_bos: int, media_ids: set[int]) -> torch.Tensor:
    """The projected Talker prompt (L + 2, talker hidden) of a request whose Thinker has its prompt in cache and has
    fed its first reply token."""
    device = thinker_runner.device
    length = req.num_prompt_tokens
    hidden = thinker_runner.cache.read_hidden(to_device(thinker_runner.slots(req.thinker.seq, 0, length), device))
    embeds = thinker.model.embed_tokens(to_device(req.prompt_ids, device))
    media = to_device([t in media_ids for t in req.prompt_ids], device, torch.bool)
    speaker = thinker.model.embed_tokens(to_device([speaker_bos], device))[0]
    return talker.project(talker.prompt_embeds(embeds, hidden, media, speaker, req.reply[0]))


def step_inputs(talker: Talker, prev_codes: torch.Tensor, elements: list[torch.Tensor]) -> torch.Tensor:
    """Projected inputs (B, talker hidden) of B code steps: previous codes (B,) on the device, reply elements."""
    return talker.project(talker.step_embeds(prev_codes, torch.stack(elements)))


def chunk_inputs(talker: Talker, req: Request, start: int, n: int, text_end_pad: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    """Projected inputs (n, talker hidden) of positions [start, start + n): the prompt's, then the code steps a
    resumed Talker recomputes (their codes are read back)."""
    head = req.num_prompt_tokens + 2
    parts = []
    if start < head:
        parts.append(req.talker_prompt[start:min(start + n, head)])
    if start + n > head:
        steps = range(max(start, head) - head + 1, start + n - head + 1)
        codes = to_device([req.talker.samples[j - 1] for j in steps], device)
        parts.append(step_inputs(talker, codes, [reply_element(req, j, text_end_pad) for j in steps]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
