"""The embedded model's draft presets really are draft-guided: forced blocks leave room in the budget, and the
masks follow the prompt (with the first-frame sink at 80% sparsity they were one static mask)."""

from __future__ import annotations

import pytest

from dit_sparse.integration.pipelines.presets import PRESETS, TINY_DEFAULT_PRESET, TINY_PRESET_PREFIX

TINY_DRAFT = [n for n, p in PRESETS.items() if n.startswith(TINY_PRESET_PREFIX) and p.config.draft is not None]


@pytest.mark.parametrize("name", TINY_DRAFT)
def test_forced_blocks_leave_room_for_the_draft(name):
    from dit_sparse.layout import TokenLayout
    from dit_sparse.methods.draft_attention import forced_draft_mask, row_budget

    cfg = PRESETS[name].config
    layout = TokenLayout(frames=5, height=8, width=8, tile=cfg.tile)  # the embedded model's default grid
    nv = layout.num_video_blocks  # Wan: no text in self-attention
    forced = forced_draft_mask(layout, cfg.draft, "cpu")[:nv, :nv].sum(-1)
    budget = row_budget(nv, cfg.draft.sparsity, cfg.draft.k_min)
    assert int(forced.max()) < budget, f"{name}: {int(forced.max())} forced blocks per row, budget {budget}"


def test_default_preset_masks_follow_the_prompt():
    from dit_sparse.tools.jobs import Job
    from dit_sparse.tools.render import Renderer

    r = Renderer("embedded", progress=False, min_tokens=0)  # sparse below the CPU break-even too
    per_prompt = []
    for prompt in ("a red circle moving right", "a blue square moving left"):
        _, _, stats, _ = r.generate(Job(prompt=prompt, steps=3), TINY_DEFAULT_PRESET, record_masks=True)
        masks = stats["masks"]
        assert len(masks) == 4
        per_prompt.append({(layer, h): m[0, h].numpy().tobytes() for layer, m in masks.items()
                           for h in range(m.shape[1])})
    for pairs in per_prompt:
        assert len(set(pairs.values())) > len(pairs) // 2, "most (layer, head) pairs share one mask: not draft-guided"
    differ = sum(per_prompt[0][k] != per_prompt[1][k] for k in per_prompt[0])
    assert differ > len(per_prompt[0]) // 2, f"only {differ} of {len(per_prompt[0])} masks change with the prompt"
