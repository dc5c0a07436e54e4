"""Talker parity with HF transformers 4.57.6: the tiny HF model with scaled random weights (``hf_compat``), its
``talker.*`` state dict loaded into ours, fp32, on the torch and Triton backends (Triton runs under
TRITON_INTERPRET=1 on CPU), over a paged KV cache with shuffled pages and a partial last page.

* the decoder itself: the same projected inputs and 3-D positions into HF's ``model`` + ``codec_head`` (prefill,
  then decode steps with ``past_key_values``) and into ours (two sequences packed in one prefill, batched decode);
* the generate path: the talker inputs built the way HF's ``Qwen2_5OmniForConditionalGeneration.generate`` builds
  them (replayed below on HF tensors), run through HF's talker ``forward`` (its ``get_rope_index``, its in-place
  codec pad/bos additions, its decode-step ``thinker_reply_part`` handling), against ours built by
  ``prompt_embeds`` / ``prompt_positions`` / ``step_embeds``.

Criterion (issue #4): max |ours - HF| <= 1e-4 * max |HF logits| per step.
"""

from __future__ import annotations

import pytest
import torch

from omni_kernels import available
from omni_model.config import OmniConfig
from omni_model.hf_compat import build_hf_model
from omni_model.layers.backend import use_backend
from omni_model.loader import random_speakers
from omni_model.models.talker import Talker

OPS = ("apply_tmrope", "store_kv_cache", "tmrope_store_kv", "paged_prefill_attention", "paged_decode_attention")


def _backend_param(name: str):
    missing = [op for op in OPS if name not in available(op, "cpu")]
    marks = pytest.mark.skip(reason=f"no {name} backend on cpu for: {', '.join(missing)}") if missing else ()
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [_backend_param("torch"), _backend_param("triton")]
REL_TOL = 1e-4
PAGE = 4  # tokens per cache page: small, so every sequence spans several shuffled pages


@pytest.fixture(scope="module")
def models():
    cfg = OmniConfig.preset("tiny")
    hf = build_hf_model(cfg, seed=11)
    talker = Talker(cfg.talker_config).eval()
    talker.load_weights(hf.state_dict())
    return cfg, hf, talker


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    print(f"{name}: max |ours - hf| = {err:.3g}, max |hf| = {scale:.3g}, ratio {err / scale:.3g}")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=REL_TOL * scale)


@torch.no_grad()
def _hf_step(hf_talker, x: torch.Tensor, positions: torch.Tensor, past=None):
    """HF's decoder + codec_head on summed inputs x (L, E) at positions (3, L): (logits (L, vocab), cache)."""
    out = hf_talker.model(inputs_embeds=hf_talker.thinker_to_talker_proj(x)[None], position_ids=positions[:, None],
                          past_key_values=past, use_cache=True)
    return hf_talker.codec_head(out.last_hidden_state)[0].float(), out.past_key_values


def _image_prompt(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Thinker-vocabulary prompt with an audio (11 mel frames = 3 tokens) and a 4 x 4-patch image (4 tokens), so
    the positions are really 3-D; returns (ids (L,), image_grid_thw (1, 3))."""
    t = cfg.thinker_config
    ids = ([10, 11, t.audio_start_token_id] + [t.audio_token_id] * 3 + [t.audio_end_token_id, 12]
           + [t.vision_start_token_id] + [t.image_token_id] * 4 + [t.vision_end_token_id, 13, 14])
    return torch.tensor(ids), torch.tensor([[1, 4, 4]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_matches_hf(models, backend, shuffled_runner):
    """Two packed prompts (text-only: 1-D positions; audio + image: 3-D positions), then three batched decode steps,
    against HF's decoder run per sequence with its own KV cache."""
    cfg, hf, talker = models
    tcfg = cfg.talker_config
    gen = torch.Generator().manual_seed(5)
    img_ids, grid = _image_prompt(cfg)
    prompts = [torch.tensor([20, 21, 22, 23, 24, 25, 26]), img_ids]  # 7 tokens (partial page), 18 tokens
    positions, deltas = [], []
    for ids in prompts:
        is_img = ids is img_ids
        pos, delta = talker.prompt_positions(ids, image_grid_thw=grid if is_img else None,
                                             audio_seqlens=torch.tensor([11]) if is_img else None)
        ref_pos, ref_delta = hf.talker.get_rope_index(ids[None], grid if is_img else None, None, torch.ones_like(
            ids)[None], False, torch.tensor([11]) if is_img else None, None)
        assert torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta.reshape(-1)[0])
        positions.append(pos)
        deltas.append(delta)
    assert not torch.equal(positions[1][0], positions[1][1])  # the image really gives 3-D ids
    lens = [len(p) for p in prompts]
    steps = 3
    xs = [torch.randn(n, tcfg.embedding_size, generator=gen) for n in lens]
    step_xs = torch.randn(steps, len(prompts), tcfg.embedding_size, generator=gen)

    refs = []
    for x, pos, delta, n, i in zip(xs, positions, deltas, lens, range(len(prompts))):
        logits, past = _hf_step(hf.talker, x, pos)
        seq = [logits]
        for k in range(steps):
            step_pos = torch.full((3, 1), n + k + delta)
            logits, past = _hf_step(hf.talker, step_xs[k, i : i + 1], step_pos, past)
            seq.append(logits)
        refs.append(seq)

    runner = shuffled_runner(talker, len(prompts) * -(-(max(lens) + steps) // PAGE) + 3, PAGE, seed=7)
    seqs = [runner.allocate(n) for n in lens]
    with torch.inference_mode(), use_backend(backend):
        hidden = runner.prefill(seqs, talker.project(torch.cat(xs)), torch.cat(positions, dim=1))
        logits = talker.logits(hidden)
        for i, part in enumerate(logits.split(lens)):
            _check(f"prefill seq{i}/{backend}", part, refs[i][0])
        for k in range(steps):
            assert runner.reserve_decode(seqs) == []
            pos = torch.tensor([n + k + d for n, d in zip(lens, deltas)]).expand(3, -1)
            hidden = runner.decode(seqs, talker.project(step_xs[k]), pos)
            logits = talker.logits(hidden)
            for i in range(len(prompts)):
                _check(f"decode{k} seq{i}/{backend}", logits[i : i + 1], refs[i][k + 1])


@torch.no_grad()
def _hf_generate_inputs(hf, cfg, ids, hidden, embeds, reply_ids, reply_hidden, speaker):
    """HF 4.57.6 ``Qwen2_5OmniForConditionalGeneration.generate``'s talker inputs, replayed on tensors: the prompt's
    embeddings zeroed at audio / image positions (``masked_scatter_`` of zeros), hidden + embedding per position,
    the speaker's bos embedding, the first reply element; later reply elements, then tts eos and pad."""
    t = cfg.thinker_config
    embed = hf.thinker.get_input_embeddings()
    embeds_to_talker = embeds.clone()[None]
    for token in (t.audio_token_id, t.image_token_id):
        mask = (ids == token)[None]
        embeds_to_talker.masked_scatter_(mask[..., None].expand_as(embeds_to_talker),
                                         torch.zeros(int(mask.sum()), embeds.shape[-1]))
    reply_part = reply_hidden[None] + embed(reply_ids)[None]
    inputs_embeds = torch.cat([hidden[None] + embeds_to_talker, embed(torch.tensor([[speaker]])), reply_part[:, :1]],
                              dim=1)
    tk = cfg.talker_config
    tail = embed(torch.tensor([[tk.tts_text_end_token_id, tk.tts_text_pad_token_id]]))
    return inputs_embeds, torch.cat([reply_part[:, 1:], tail], dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_path_matches_hf(models, backend, shuffled_runner):
    """Prompt construction, positions and decode steps as HF's generate drives its talker ``forward``."""
    cfg, hf, talker = models
    tk = cfg.talker_config
    gen = torch.Generator().manual_seed(9)
    ids, grid = _image_prompt(cfg)
    n, width = len(ids), tk.embedding_size
    hidden, embeds = torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen)
    reply_ids = torch.tensor([30, 31, 32])
    reply_hidden = torch.randn(len(reply_ids), width, generator=gen)
    speaker = random_speakers(cfg)["Chelsie"]["bos_token"]
    codes = [5, 17, 42, 60]  # the previously sampled code fed at each decode step
    audio_lens = torch.tensor([11])

    # HF: prefill through the talker's forward (attention_mask given: get_rope_index + codec pad/bos in place).
    inputs_embeds, reply_rest = _hf_generate_inputs(hf, cfg, ids, hidden, embeds, reply_ids, reply_hidden, speaker)
    text_ids = torch.cat([ids, torch.tensor([speaker]), reply_ids[:1]])[None]
    codec_ids = torch.tensor([[tk.tts_codec_mask_token_id] * n + [tk.tts_codec_pad_token_id,
                                                                  tk.tts_codec_start_token_id]])
    hf_embeds = inputs_embeds.clone()
    refs = []
    with torch.no_grad():
        out = hf.talker(input_ids=codec_ids, input_text_ids=text_ids, inputs_embeds=hf_embeds,
                        attention_mask=torch.ones_like(codec_ids), image_grid_thw=grid,
                        audio_feature_lengths=audio_lens, use_cache=True)
        refs.append(out.logits[0])
        past, rest = out.past_key_values, reply_rest
        for k, code in enumerate(codes):
            length = n + 2 + k
            out = hf.talker(input_ids=torch.tensor([[code]]), thinker_reply_part=rest,
                            attention_mask=torch.ones(1, length + 1, dtype=torch.long), past_key_values=past,
                            cache_position=torch.tensor([length]), use_cache=True)
            refs.append(out.logits[0])
            past, rest = out.past_key_values, out.thinker_reply_part

    # Ours.
    thinker_embed = hf.thinker.get_input_embeddings()
    t = cfg.thinker_config
    media = (ids == t.audio_token_id) | (ids == t.image_token_id)
    reply = reply_hidden + thinker_embed(reply_ids)
    with torch.no_grad():
        prompt = talker.prompt_embeds(embeds, hidden, media, thinker_embed(torch.tensor(speaker)), reply[0])
        # HF's forward added the codec pad / bos embeddings to ``hf_embeds`` in place: the same sums, bit for bit.
        torch.testing.assert_close(prompt, hf_embeds[0], rtol=0, atol=0)
        # The tts eos / pad elements that follow the reply in HF's thinker_reply_part.
        elements = torch.cat([reply[1:], thinker_embed(torch.tensor([tk.tts_text_end_token_id,
                                                                     tk.tts_text_pad_token_id]))])
        torch.testing.assert_close(elements, reply_rest[0], rtol=0, atol=0)
        elements = torch.cat([elements, elements[-1:].expand(len(codes), -1)])  # tts pad forever
    positions, delta = talker.prompt_positions(text_ids[0], image_grid_thw=grid, audio_seqlens=audio_lens)
    runner = shuffled_runner(talker, -(-(n + 2 + len(codes)) // PAGE) + 3, PAGE, seed=3)
    seq = runner.allocate(n + 2)
    with torch.inference_mode(), use_backend(backend):
        logits = talker.logits(runner.prefill([seq], talker.project(prompt), positions))
        _check(f"generate prefill/{backend}", logits, refs[0])
        for k, code in enumerate(codes):
            length = n + 2 + k
            x = talker.step_embeds(torch.tensor([code]), elements[k : k + 1])
            assert runner.reserve_decode([seq]) == []
            logits = talker.logits(runner.decode([seq], talker.project(x), torch.full((3, 1), length + delta)))
            _check(f"generate decode{k}/{backend}", logits, refs[k + 1])


def test_load_weights_is_strict(models):
    cfg, hf, _ = models
    state = {k: v for k, v in hf.state_dict().items() if k.startswith("talker.")}
    state.pop("talker.model.layers.1.self_attn.k_proj.bias")
    state["talker.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    state["talker.lm_head.weight"] = torch.zeros(1)
    talker = Talker(cfg.talker_config)
    with pytest.raises(ValueError) as err:
        talker.load_weights(state)
    msg = str(err.value)
    for name in ("layers.1.self_attn.k_proj.bias", "layers.0.mlp.up_proj.weight", "talker.lm_head.weight"):
        assert name in msg
