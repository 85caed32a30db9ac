"""Wan2.2-Animate (``WanAnimateTransformer3DModel``): Wan's self-attention sparse, the face blocks stock.

The transformer's blocks use a copy of ``WanAttnProcessor`` (same class name, same code), so Wan's sparse
processor serves ``blocks.*.attn1`` (:mod:`dit_sparse.integration.adapters.wan`). The grid is the patch grid of the
``hidden_states`` latent, which holds the reference frame plus the segment's frames (``T + 1``); the pose latents
are added into those tokens, not appended. Cross-attention (``attn2``) and the face-adapter cross-attention
(``face_adapter.*``, ``WanAnimateFaceBlockAttnProcessor``) keep their stock processors.
"""

from __future__ import annotations

import dataclasses

from .registry import FAMILIES
from .wan import SPEC as WAN

SPEC = dataclasses.replace(WAN, family=FAMILIES["wan-animate"])
