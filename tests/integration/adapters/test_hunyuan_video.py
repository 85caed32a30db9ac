"""HunyuanVideo adapter: the table entry (generic contract in test_contract.py: parity with padded text, text
last, token refiner stock, lifecycle, pipeline) and HunyuanVideo's own cases: padded-text masks, single-stream
blocks, token-replace blocks, CFG branches.

The tiny pipeline pads its text (``max_sequence_length=16`` with a short prompt, no template crop), so the
transformer's bool key-padding mask ``[B, 1, 1, N]`` has padded text keys in every pipeline test here.
"""

from __future__ import annotations

import pytest
import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import clip_encoder, clip_tokenizer, generator, llama_encoder, llama_tokenizer, seeded

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig
from dit_sparse.integration.adapters.hunyuan_video import valid_prefix_length

GRID = (3, 12, 12)  # latent frames, rows, cols (patch 1): 432 video tokens = 27 blocks of 16
N_VIDEO = GRID[0] * GRID[1] * GRID[2]
TEXT = 16


def hunyuan_transformer(**extra):
    from diffusers import HunyuanVideoTransformer3DModel

    return seeded(HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                  attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                  patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                  rope_axes_dim=(2, 4, 4), **extra)


def hunyuan_pipeline():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = seeded(AutoencoderKLHunyuanVideo, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                 up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
                 act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
                 temporal_compression_ratio=4, mid_block_add_attention=True)
    return HunyuanVideoPipeline(transformer=hunyuan_transformer(), vae=vae, text_encoder=llama_encoder(),
                                tokenizer=llama_tokenizer(), text_encoder_2=clip_encoder(8),
                                tokenizer_2=clip_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def run(pipe, seed=0, steps=2, **kw):
    return pipe(prompt="a red ball", num_inference_steps=steps, height=64, width=64, num_frames=9,
                guidance_scale=4.5, max_sequence_length=16, prompt_template={"template": "{}", "crop_start": 0},
                output_type="np", generator=generator(seed), **kw).frames[0]


def transformer_inputs(valid=(11,), batch=None):
    """Forward kwargs; ``valid[b]`` = number of valid text tokens of sample b (the rest is padding)."""
    b = len(valid) if batch is None else batch
    g = generator(1)
    mask = torch.zeros(b, TEXT)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return dict(hidden_states=torch.randn(b, 4, *GRID, generator=g), timestep=torch.tensor([500.0] * b),
                encoder_hidden_states=torch.randn(b, TEXT, 16, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(b, 8, generator=g), guidance=torch.tensor([4500.0] * b),
                return_dict=False)


REFINER = "context_embedder.token_refiner.refiner_blocks.0.attn.processor"
CASES = [AdapterCase(
    id="hunyuanvideo", transformer=hunyuan_transformer, inputs=lambda tr: transformer_inputs(), grid=GRID,
    sparse=("transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"),
    stock=(REFINER,),  # the token refiner keeps AttnProcessor2_0
    pipeline=hunyuan_pipeline, run=lambda pipe, steps: run(pipe, steps=steps), preset="hunyuanvideo:draft-90",
    cp="no-plan",
)]


def spy_engine(rt):
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


# ---------------------------------------------------------------- transformer


@torch.no_grad()
@pytest.mark.parametrize("valid", [(11,), (TEXT,)], ids=["padded", "unpadded"])
def test_transformer_all_on_plan_matches_stock(valid):
    tr = hunyuan_transformer()
    ref = tr(**transformer_inputs(valid))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    lengths = spy_engine(rt)
    out = tr(**transformer_inputs(valid))[0]
    torch.testing.assert_close(out, ref, **TOL)
    assert rt.calls == {"sparse": 2, "dense": 0} and rt.context.grid == GRID
    # padded text: sparse attention ran on video + the valid text prefix only (dual- and single-stream)
    assert lengths == [N_VIDEO + valid[0]] * 2


@torch.no_grad()
def test_dense_layers_with_padding_are_bit_exact(monkeypatch):
    # the dense policy decides inside attend(), after truncation: ONE stock call must cover every row
    import dit_sparse.integration.adapters.base as adapter

    tr = hunyuan_transformer()
    ref = tr(**transformer_inputs())[0]
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16, backend="torch",
                                dense=DensePolicy(dense_layers={0, 1}))
    (rt,) = dit_sparse.apply(tr, cfg)
    stock_rows = []
    orig = adapter.dispatch_attention_fn
    monkeypatch.setattr(adapter, "dispatch_attention_fn",
                        lambda q, *a, **k: stock_rows.append(q.shape[1]) or orig(q, *a, **k))
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert stock_rows == [N_VIDEO + TEXT] * 2
    assert rt.calls == {"sparse": 0, "dense": 2}


@torch.no_grad()
def test_batch_with_different_text_lengths_runs_stock():
    inputs = transformer_inputs(valid=(11, 7))
    tr = hunyuan_transformer()
    ref = tr(**inputs)[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**transformer_inputs(valid=(11, 7)))[0], ref)  # not one common prefix: stock call
    assert rt.calls == {"sparse": 0, "dense": 2}


@torch.no_grad()
def test_batch_with_equal_text_lengths_runs_sparse():
    tr = hunyuan_transformer()
    ref = tr(**transformer_inputs(valid=(9, 9)))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    lengths = spy_engine(rt)
    torch.testing.assert_close(tr(**transformer_inputs(valid=(9, 9)))[0], ref, **TOL)
    assert lengths == [N_VIDEO + 9] * 2


@torch.no_grad()
def test_token_replace_blocks_are_served():
    # the I2V variant uses HunyuanVideoTokenReplace*Block with the same processor class
    tr = hunyuan_transformer(image_condition_type="token_replace")
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    torch.testing.assert_close(tr(**transformer_inputs())[0], ref, **TOL)
    assert rt.calls["sparse"] == 2


# ---------------------------------------------------------------- processor level: text position, masks


def attention_inputs(tr, n_valid_text=11, seed=2):
    g = generator(seed)
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    video = torch.randn(1, N_VIDEO, inner, generator=g)
    text = torch.randn(1, TEXT, inner, generator=g)
    mask = torch.ones(1, 1, 1, N_VIDEO + TEXT, dtype=torch.bool)
    mask[..., N_VIDEO + n_valid_text:] = False
    rope = tr.rope(torch.zeros(1, 4, *GRID))
    return dict(hidden_states=video, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=rope)


@torch.no_grad()
@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
@pytest.mark.parametrize("n_valid_text", [11, TEXT, 0])  # 0: all text padded (the stock transformer gives NaN)
def test_text_rows_are_dense_exact_under_sparse_plan(block, n_valid_text):
    """Text is LAST: with a sparse plan, text query rows (dense by design) and padded rows equal stock.

    Placing text on the wrong side would sparsify real text rows and break this.
    """
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    tr = hunyuan_transformer()
    attn = getattr(tr, block)[0].attn
    kw = attention_inputs(tr, n_valid_text)
    ref_video, ref_text = HunyuanVideoAttnProcessor2_0()(attn, **kw)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    rt.context.grid = GRID
    video, text = attn.processor(attn, **kw)
    assert rt.calls == {"sparse": 1, "dense": 0} and rt.density < 1.0
    torch.testing.assert_close(text, ref_text, **TOL)
    assert not torch.allclose(video, ref_video, atol=1e-4)


@torch.no_grad()
def test_single_stream_call_without_encoder_states_takes_text_length_from_grid():
    """``[video, text]`` as one tensor with ``encoder_hidden_states=None``: text = tokens - grid's video tokens."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    tr = hunyuan_transformer()
    attn = tr.single_transformer_blocks[0].attn
    kw = attention_inputs(tr)
    joint = torch.cat([kw["hidden_states"], kw["encoder_hidden_states"]], dim=1)
    call = dict(hidden_states=joint, encoder_hidden_states=None, attention_mask=kw["attention_mask"])
    ref, none = HunyuanVideoAttnProcessor2_0()(attn, **call)
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    rt.context.grid = GRID
    layouts = []
    orig_layout = rt.layout
    rt.layout = lambda grid, text_tokens, pos: layouts.append((grid, text_tokens, pos)) or orig_layout(
        grid, text_tokens, pos)
    out, none2 = attn.processor(attn, **call)
    assert none is None and none2 is None
    torch.testing.assert_close(out, ref, **TOL)
    assert layouts == [(GRID, 11, "after")]  # 16 text tokens, 5 padded: sparse over video + 11


@torch.no_grad()
@pytest.mark.parametrize("mask_kind", ["hole-in-text", "hole-in-video", "float", "square"])
def test_masks_that_are_not_a_valid_prefix_run_stock(mask_kind):
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    tr = hunyuan_transformer()
    attn = tr.transformer_blocks[0].attn
    kw = attention_inputs(tr)
    n = N_VIDEO + TEXT
    mask = kw["attention_mask"]
    if mask_kind == "hole-in-text":
        mask[..., N_VIDEO + 3] = False
    elif mask_kind == "hole-in-video":
        mask[..., 5] = False
    elif mask_kind == "float":
        mask = torch.zeros(1, 1, 1, n).masked_fill(~mask, float("-inf"))
    else:  # [B, 1, N, N]
        mask = mask.expand(1, 1, n, n).clone()
    kw["attention_mask"] = mask
    ref = HunyuanVideoAttnProcessor2_0()(attn, **kw)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    rt.context.grid = GRID
    out = attn.processor(attn, **kw)
    assert rt.calls == {"sparse": 0, "dense": 1}
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_valid_prefix_length():
    def mask(*rows):
        return torch.tensor(rows, dtype=torch.bool)[:, None, None, :]

    t, f = True, False
    assert valid_prefix_length(None, 2, 6, 3) == 6
    assert valid_prefix_length(mask([t] * 6), 1, 6, 3) == 6
    assert valid_prefix_length(mask([t, t, t, t, f, f]), 1, 6, 3) == 4
    assert valid_prefix_length(mask([t, t, t, t, f, f], [t, t, t, t, f, f]), 2, 6, 3) == 4
    assert valid_prefix_length(mask([t, t, t, t, f, f]), 2, 6, 3) == 4  # batch-broadcast mask
    assert valid_prefix_length(mask([t, t, t, t, f, f], [t, t, t, t, t, f]), 2, 6, 3) is None  # lengths differ
    assert valid_prefix_length(mask([t, t, t, f, t, f]), 1, 6, 3) is None  # not a prefix
    assert valid_prefix_length(mask([t, t, f, f, f, f]), 1, 6, 3) is None  # a video key masked
    assert valid_prefix_length(mask([t, t, t, t, f, f]).float(), 1, 6, 3) is None  # float bias
    assert valid_prefix_length(torch.ones(1, 6, dtype=torch.bool), 1, 6, 3) is None  # [B, N]
    assert valid_prefix_length(mask([t] * 5), 1, 6, 3) is None  # wrong length


# ---------------------------------------------------------------- pipeline


@torch.no_grad()
def test_pipeline_all_on_plan_matches_stock():
    pipe = hunyuan_pipeline()
    ref = run(pipe)
    (rt,) = dit_sparse.apply(pipe, ALL_ON)
    out = run(pipe)
    assert abs(out - ref).max() < 1e-5 and rt.last_run["calls"]["sparse"] == 4


@torch.no_grad()
def test_pipeline_branches_cond_and_true_cfg_uncond():
    pipe = hunyuan_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    lengths = spy_engine(rt)
    branches = []
    orig = rt.engine.build_mask
    rt.engine.build_mask = lambda *a, **k: branches.append(rt.context.branch) or orig(*a, **k)
    run(pipe)
    assert set(branches) == {"cond"}
    # the pipeline padded the text: sparse attention ran on video (3x8x8) + a strict prefix of the 16 text tokens
    assert len(set(lengths)) == 1 and 3 * 8 * 8 < lengths[0] < 3 * 8 * 8 + TEXT
    branches.clear()
    run(pipe, negative_prompt="blur", true_cfg_scale=2.0)
    assert set(branches) == {"cond", "uncond"} and rt.last_run["calls"]["sparse"] == 8
