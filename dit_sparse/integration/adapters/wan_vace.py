"""Wan VACE (``WanVACETransformer3DModel``): Wan's self-attention, in the main blocks and the VACE blocks.

The VACE blocks (``vace_blocks.*``) run first on the control stream, which is patch-embedded on the same grid and
zero-padded to the video's token count, with the video's RoPE: their ``attn1`` is self-attention over the same
``(frames, rows, cols)`` grid and runs sparse like the main blocks' ``attn1``. Cross-attention (``attn2``) stays
stock. Layer indices follow registration order (main blocks first, then the VACE blocks), so a preset's
``dense_layers=(0,)`` means main block 0, as for Wan. Processor and grid: :mod:`dit_sparse.integration.adapters.wan`.
"""

from __future__ import annotations

import dataclasses

from .registry import FAMILIES
from .wan import SPEC as WAN

SPEC = dataclasses.replace(WAN, family=FAMILIES["wan-vace"])
