"""HunyuanVideo 1.5 adapter: the table entry (generic contract in test_contract.py) and its own cases: the
reordered, padded text (``[valid image, valid ByT5, valid MLLM, padding]``), per-sample lengths, the refiner.

The tiny inputs pad both text streams and pass zero image embeddings (text-to-video: the image tokens are invalid),
so every call here has padded text keys and padded text query rows.
"""

from __future__ import annotations

import pytest
import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import generator, qwen_tokenizer, seeded

import dit_sparse
from dit_sparse.integration.apply import attn_processors

GRID = (3, 8, 8)  # latent frames, rows, cols (patch 1): 192 video tokens = 12 blocks of 16
N_VIDEO = GRID[0] * GRID[1] * GRID[2]
MLLM, BYT5, IMAGE = 12, 6, 5  # text tokens per stream; image tokens = image_embeds length


def hv15_transformer(in_channels=4):
    from diffusers import HunyuanVideo15Transformer3DModel

    return seeded(HunyuanVideo15Transformer3DModel, in_channels=in_channels, out_channels=4, num_attention_heads=2,
                  attention_head_dim=16, num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
                  text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6),
                  target_size=64)


def transformer_inputs(valid=((7, 4),), image=False):
    """``valid[b] = (valid MLLM tokens, valid ByT5 tokens)`` of sample b; ``image``: non-zero image embeddings
    (image-to-video, image tokens valid)."""
    b = len(valid)
    g = generator(1)
    mask, mask_2 = torch.zeros(b, MLLM), torch.zeros(b, BYT5)
    for i, (n, n2) in enumerate(valid):
        mask[i, :n], mask_2[i, :n2] = 1, 1
    image_embeds = torch.randn(b, IMAGE, 8, generator=g) if image else torch.zeros(b, IMAGE, 8)
    return dict(hidden_states=torch.randn(b, 4, *GRID, generator=g), timestep=torch.tensor([500.0] * b),
                encoder_hidden_states=torch.randn(b, MLLM, 16, generator=g), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(b, BYT5, 8, generator=g), encoder_attention_mask_2=mask_2,
                image_embeds=image_embeds, return_dict=False)


def hv15_pipeline():
    """The real ``HunyuanVideo15Pipeline``, tiny: Qwen2.5-VL text model (3 layers, hidden 16) with a byte-level
    tokenizer, ByT5 (a 1-layer T5) for quoted glyph text, a 3-level VAE (4x space and time), CFG guider.

    The pipeline's prompt sizes are instance attributes: the system prompt is emptied and cropped off (as the real
    template crop does), 16 MLLM tokens, 8 ByT5 tokens, 4 image tokens (zero embeddings for text-to-video).
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tok = qwen_tokenizer()
    text_encoder = seeded(Qwen2_5_VLTextModel, Qwen2_5_VLTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 3,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}))
    tok_2 = ByT5Tokenizer()
    text_encoder_2 = seeded(T5EncoderModel, T5Config(vocab_size=len(tok_2), d_model=8, d_ff=16, d_kv=4, num_heads=2,
                                                     num_layers=1, relative_attention_num_buckets=8, pad_token_id=0,
                                                     eos_token_id=1, decoder_start_token_id=0))
    vae = seeded(AutoencoderKLHunyuanVideo15, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                 spatial_compression_ratio=4, temporal_compression_ratio=4)
    # in_channels: latents 4 + image-condition latents 4 + mask 1
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tok, transformer=hv15_transformer(9), vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                  tokenizer_2=tok_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.system_message = ""
    prefix = tok.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
                                     tokenize=False).split("x")[0]
    pipe.prompt_template_encode_start_idx = len(tok(prefix)["input_ids"])
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 16, 8, 4
    return pipe


def run(pipe, steps=2, seed=0):
    # 9 frames x 32 x 32 px -> 3 x 8 x 8 latent tokens; the quoted text goes through ByT5
    return pipe(prompt='a sign saying "hi"', negative_prompt="", num_inference_steps=steps, height=32, width=32,
                num_frames=9, output_type="np", generator=generator(seed)).frames[0]


SPARSE_PROCS = ("transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor")
REFINER = "context_embedder.token_refiner.refiner_blocks.0.attn.processor"

CASES = [
    AdapterCase(id="hunyuanvideo15", transformer=hv15_transformer, inputs=lambda tr: transformer_inputs(),
                grid=GRID, sparse=SPARSE_PROCS, stock=(REFINER,), pipeline=hv15_pipeline, run=run,
                preset="hunyuanvideo15:draft-90", cp="no-plan"),
    AdapterCase(id="hunyuanvideo15-i2v", transformer=hv15_transformer,
                inputs=lambda tr: transformer_inputs(image=True), grid=GRID, sparse=SPARSE_PROCS, stock=(REFINER,),
                cp="no-plan"),
]


def spy_lengths(rt):
    """Record the query length of every sparse engine call."""
    lengths = []
    engine = rt.engine
    orig = type(engine).sparse_attention

    class Spy(type(engine)):
        def sparse_attention(self, query, *args, **kwargs):
            lengths.append(query.shape[1])
            return orig(self, query, *args, **kwargs)

    engine.__class__ = Spy
    return lengths


@torch.no_grad()
@pytest.mark.parametrize("valid,image,n_text", [(((7, 4),), False, 11), (((7, 4),), True, 16),
                                                (((MLLM, BYT5),), False, MLLM + BYT5)],
                         ids=["t2v-padded", "i2v-padded", "t2v-unpadded"])
def test_sparse_runs_on_video_plus_the_valid_text_prefix(valid, image, n_text):
    """The valid text (image + ByT5 + MLLM) is a prefix after the video: sparse attention covers exactly it."""
    tr = hv15_transformer()
    ref = tr(**transformer_inputs(valid, image))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    lengths = spy_lengths(rt)
    torch.testing.assert_close(tr(**transformer_inputs(valid, image))[0], ref, **TOL)
    assert lengths == [N_VIDEO + n_text] * 2


@torch.no_grad()
def test_batch_with_different_text_lengths_runs_stock():
    inputs = dict(valid=((7, 4), (5, 4)))
    tr = hv15_transformer()
    ref = tr(**transformer_inputs(**inputs))[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**transformer_inputs(**inputs))[0], ref)  # not one common prefix: the stock call
    assert rt.calls == {"sparse": 0, "dense": 2}


@torch.no_grad()
def test_batch_with_equal_text_lengths_runs_sparse():
    inputs = dict(valid=((6, 3), (6, 3)))
    tr = hv15_transformer()
    ref = tr(**transformer_inputs(**inputs))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    lengths = spy_lengths(rt)
    torch.testing.assert_close(tr(**transformer_inputs(**inputs))[0], ref, **TOL)
    assert lengths == [N_VIDEO + 9] * 2


@torch.no_grad()
def test_padded_text_rows_equal_stock_under_a_sparse_plan():
    """Padded text query rows see no key in stock: they run the stock call on those rows only, bit for bit."""
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    tr = hv15_transformer()
    attn = tr.transformer_blocks[0].attn
    g = generator(2)
    inner = 32
    text_mask = torch.zeros(1, 10)
    text_mask[:, :6] = 1
    kw = dict(hidden_states=torch.randn(1, N_VIDEO, inner, generator=g),
              encoder_hidden_states=torch.randn(1, 10, inner, generator=g), attention_mask=text_mask,
              image_rotary_emb=tr.rope(torch.zeros(1, 4, *GRID)))
    ref_video, ref_text = HunyuanVideo15AttnProcessor2_0()(attn, **kw)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    rt.context.grid = GRID
    video, text = attn.processor(attn, **kw)
    assert rt.calls == {"sparse": 1, "dense": 0}
    torch.testing.assert_close(text[:, :6], ref_text[:, :6], **TOL)  # valid text rows read every valid key
    torch.testing.assert_close(text[:, 6:], ref_text[:, 6:], rtol=0, atol=0)  # padded rows: the stock rows
    assert not torch.allclose(video, ref_video, atol=1e-4)


def test_refiner_keeps_its_processor_class():
    tr = hv15_transformer()
    dit_sparse.apply(tr, SPARSE)
    assert type(attn_processors(tr)[REFINER]).__name__ == "AttnProcessor2_0"
