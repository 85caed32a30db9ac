"""Qwen-Image adapter: the table entries (generic contract in test_contract.py: parity with padded and unpadded
text, text first, lifecycle, Ulysses) and Qwen-Image's own cases: the grid from img_shapes (several images per
sample run dense), masks that are not one valid text prefix run stock, the valid-prefix reader."""

from __future__ import annotations

import pytest
import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import generator, seeded

import dit_sparse
from dit_sparse.integration.adapters.qwenimage import image_grid, valid_text_prefix

ROWS, COLS, TEXT = 12, 16, 10  # packed latent grid (non-square) and text tokens (not a block multiple)


def qwen_transformer(seed=0):
    from diffusers import QwenImageTransformer2DModel

    return seeded(QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
                  seed=seed)


def transformer_inputs(valid=None, batch=1, shapes=None):
    """Forward kwargs; ``valid[b]``: valid text tokens of sample b (None: no mask, as the pipeline passes when
    nothing is padded)."""
    b = len(valid) if valid is not None else batch
    g = generator(1)
    mask = None
    if valid is not None:
        mask = torch.zeros(b, TEXT, dtype=torch.long)
        for i, n in enumerate(valid):
            mask[i, :n] = 1
    shapes = [[(1, ROWS, COLS)]] * b if shapes is None else shapes
    return dict(hidden_states=torch.randn(b, ROWS * COLS, 16, generator=g),
                encoder_hidden_states=torch.randn(b, TEXT, 16, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.5] * b), img_shapes=shapes, return_dict=False)


def qwen_pipeline():
    """The real QwenImagePipeline; no text encoder (prompt embeddings are given: its Qwen2.5-VL encoder has no tiny
    offline recipe here), tiny Qwen-Image VAE (factor 8, 4 latent channels packed 2 x 2 into 16)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    vae = seeded(AutoencoderKLQwenImage, base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=qwen_transformer())


def run(pipe, steps=2, seed=0):
    """192 x 256 px -> latent 24 x 32 -> packed grid (1, 12, 16); true CFG with a negative prompt whose last 3 of 10
    text tokens are padding (its calls take the valid-text-prefix path)."""
    neg_mask = torch.ones(1, TEXT, dtype=torch.long)
    neg_mask[:, 7:] = 0
    return pipe(prompt_embeds=torch.randn(1, TEXT, 16, generator=generator(5)),
                prompt_embeds_mask=torch.ones(1, TEXT, dtype=torch.long),
                negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=generator(6)),
                negative_prompt_embeds_mask=neg_mask, true_cfg_scale=4.0, height=16 * ROWS, width=16 * COLS,
                num_inference_steps=steps, output_type="np", generator=generator(seed)).images


SPARSE_NAMES = ("transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor")
CASES = [
    AdapterCase(id="qwenimage", transformer=qwen_transformer, inputs=lambda tr: transformer_inputs(),
                grid=(1, ROWS, COLS), sparse=SPARSE_NAMES, pipeline=qwen_pipeline, run=run,
                preset="qwenimage:draft-50", cp="ulysses"),
    # a padded batch with one common valid prefix: sparse on [valid text, image], padded rows stock
    AdapterCase(id="qwenimage-padded", transformer=qwen_transformer,
                inputs=lambda tr: transformer_inputs(valid=(7, 7)), grid=(1, ROWS, COLS), sparse=SPARSE_NAMES,
                cp="ulysses", cp_inputs=lambda tr: transformer_inputs(batch=2), text_rows=False),
]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["different-lengths", "hole-in-text"])
def test_masks_that_are_not_one_valid_prefix_run_stock(kind):
    def inputs():
        kw = transformer_inputs(valid=(7, 4) if kind == "different-lengths" else (7, 7))
        if kind == "hole-in-text":
            kw["encoder_hidden_states_mask"][:, 2] = 0
        return kw

    tr = qwen_transformer()
    ref = tr(**inputs())[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**inputs())[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 2}


@torch.no_grad()
def test_padded_text_rows_and_valid_rows():
    """Padded batch, sparse plan: the valid text rows and padded text rows equal stock (text rows are dense), the
    image rows differ; the sparse calls saw video + the 7 valid text tokens."""
    tr = qwen_transformer()
    attn = tr.transformer_blocks[0].attn
    outs = []
    attn.register_forward_hook(lambda m, a, out: outs.append(out))
    tr(**transformer_inputs(valid=(7, 7)))
    (rt,) = dit_sparse.apply(tr, SPARSE)
    lengths = []
    orig = rt.layout
    rt.layout = lambda grid, text, pos: lengths.append(text) or orig(grid, text, pos)
    tr(**transformer_inputs(valid=(7, 7)))
    (img_ref, txt_ref), (img, txt) = outs
    torch.testing.assert_close(txt, txt_ref, **TOL)
    assert not torch.allclose(img, img_ref, atol=1e-4)
    assert lengths == [7, 7]


@torch.no_grad()
def test_all_on_with_padding_matches_stock():
    tr = qwen_transformer()
    ref = tr(**transformer_inputs(valid=(7, 7)))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    torch.testing.assert_close(tr(**transformer_inputs(valid=(7, 7)))[0], ref, **TOL)
    assert rt.calls == {"sparse": 2, "dense": 0}


def test_grid_from_img_shapes():
    tr = qwen_transformer()
    kw = transformer_inputs(batch=2)
    assert image_grid(tr, (), kw) == (1, ROWS, COLS)
    assert image_grid(tr, (), {**kw, "img_shapes": [(1, ROWS, COLS)] * 2}) == (1, ROWS, COLS)
    # an edit model's reference image: two images per sample -> no grid
    assert image_grid(tr, (), {**kw, "img_shapes": [[(1, ROWS, COLS), (1, ROWS, COLS)]] * 2}) is None
    assert image_grid(tr, (), {**kw, "img_shapes": [[(1, COLS, ROWS)]] * 2}) == (1, COLS, ROWS)
    assert image_grid(tr, (), {**kw, "img_shapes": [[(1, ROWS, COLS + 1)]] * 2}) is None  # token count differs
    assert image_grid(tr, (), {**kw, "img_shapes": None}) is None


@torch.no_grad()
def test_several_images_per_sample_run_stock():
    tr = qwen_transformer()
    g = generator(3)
    kw = transformer_inputs(shapes=[[(1, ROWS, COLS // 2), (1, ROWS, COLS // 2)]])
    kw["hidden_states"] = torch.randn(1, ROWS * COLS, 16, generator=g)
    ref = tr(**kw)[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**kw)[0], ref)
    assert rt.context.grid is None and rt.calls == {"sparse": 0, "dense": 2}


def test_valid_text_prefix():
    def mask(*rows):
        return torch.tensor(rows, dtype=torch.bool)[:, None, None, :]

    t, f = True, False
    assert valid_text_prefix(mask([t, t, f, t, t]), 3) == 2
    assert valid_text_prefix(mask([t, t, f, t, t], [t, t, f, t, t]), 3) == 2
    assert valid_text_prefix(mask([t, t, t, t, t]), 3) == 3
    assert valid_text_prefix(mask([t, t, f, t, t], [t, f, f, t, t]), 3) is None  # lengths differ
    assert valid_text_prefix(mask([t, f, t, t, t]), 3) is None  # not a prefix
    assert valid_text_prefix(mask([t, t, f, t, f]), 3) is None  # an image key masked
    assert valid_text_prefix(mask([t, t, f, t, t]).float(), 3) is None  # float bias
