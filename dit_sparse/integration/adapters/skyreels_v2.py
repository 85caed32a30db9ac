"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan's architecture, its own copy of the processor.

``SkyReelsV2AttnProcessor`` is ``WanAttnProcessor`` line for line for self-attention, so Wan's sparse processor and
grid serve it (:mod:`dit_sparse.integration.adapters.wan`). Self-attention ``attn1`` runs sparse, cross-attention
``attn2`` stays stock. Diffusion-forcing configs with ``num_frame_per_block > 1`` pass a block-causal mask to
self-attention: those calls run the stock attention (with the mask), exactly.
"""

from __future__ import annotations

import dataclasses

from .registry import FAMILIES
from .wan import SPEC as WAN

SPEC = dataclasses.replace(WAN, family=FAMILIES["skyreels-v2"],
                           processor_classes=("SkyReelsV2AttnProcessor", "SkyReelsV2AttnProcessor2_0"))
