"""Pooled rectification: Rectified SpaAttn (arXiv 2511.19835; BienLuky/Rectified-SpaAttn), docs/rectification.md.

Plain block-sparse attention renormalises over the kept key blocks (it *amplifies* them by ``1 / kept mass``) and
*loses* the dropped blocks. Rectified SpaAttn estimates every block's share of the full attention from pooled
(block-mean) queries and keys and corrects both biases in the output epilogue of the one sparse kernel
(docs/plan.md#epilogue)::

    O_u = R_i * SparseAttn_u(C_i) + c_i          for every query token u of video block i

* **IPAR** (isolated-pooling attention reallocation, docs/rectification.md#ipar): ``P̃ [B, H, Nv, Nv + 1]``, the
  block-level attention of pooled queries over pooled video keys (weighted by their true token counts) **plus every
  valid text token un-pooled**, with the text mass collapsed into one column. ``R_i`` is the mass ``P̃`` gives to the
  blocks the sparse kernel reads (plus the dropped blocks whose pooled estimate is not trusted).
* **GAPR** (gain-aware pooling rectification, docs/rectification.md#gapr): a dropped block ``j`` is compensated with
  ``P̃_ij * v̄_j`` only where the pooled logit's magnitude exceeds a first-order bound on its pooling error (``Z_ij =
  G_ij > E_ij``).
* **Selection** (docs/rectification.md#selection): per query block, top-p (``top_p``) over ``P̃`` with a top-k floor
  (``int((1 - sparsity) * Nv)``), plus 3-D tile neighbours, text columns, dense text rows and (Wan) the
  first-frame rule.

Everything works on **permuted** tensors (``TokenLayout.permute``: video tiles first, then text blocks, zeros in
padding slots) and is vectorised over batch, heads and blocks. Pooled statistics are true-count means (the
reference averages zero padding in). ``R`` and ``c`` are per query block and ride on the plan's epilogue
(``out_scale = R [B, H, N]``, ``out_bias = c.transpose(1, 2) [B, N, H, D]``).

Shapes: B batch, P = ``layout.padded_len``, H heads, D head dim, N = ``layout.num_blocks`` blocks (``Nv`` video
first, then text), Nt = ``layout.text_tokens``.

Example::

    layout = TokenLayout(frames=21, height=30, width=52)
    q, k, v = (layout.permute(t) for t in (query, key, value))        # [B, P, H, D]
    plan = rectified_plan(q, k, v, layout, PooledRectificationConfig(sparsity=0.8))
    out = layout.unpermute(dit_sparse.block_sparse_attention(q, k, v, plan))

The parts live in :mod:`dit_sparse.methods.rectification` (config, statistics, selection, block_combine,
row_combine); this module is the method's face: :func:`rectified_attention` (either combine mode) and the public
names of the parts.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..ops import block_sparse_attention
from .rectification.block_combine import rectification_terms, rectified_plan
from .rectification.config import (
    COMBINE_MODES,
    ROW_KEYS,
    PooledRectificationConfig,
    _check_config,
    _check_scale,
)
from .rectification.row_combine import merge_partials, pooled_remainder, pooled_segment, row_rectified_attention
from .rectification.selection import (
    MASS_SLACK,
    _stats_and_mask,
    neighbour_mask,
    rectified_mask,
    select_critical_blocks,
    selection_width,
)
from .rectification.statistics import (
    BlockStatistics,
    CallStatistics,
    block_statistics,
    gapr_reliable,
    ipar_probabilities,
    outlier_keys,
    row_outlier_count,
)

__all__ = [
    "BlockStatistics",
    "CallStatistics",
    "COMBINE_MODES",
    "MASS_SLACK",
    "PooledRectificationConfig",
    "ROW_KEYS",
    "block_statistics",
    "gapr_reliable",
    "ipar_probabilities",
    "merge_partials",
    "neighbour_mask",
    "outlier_keys",
    "pooled_remainder",
    "pooled_segment",
    "rectification_terms",
    "rectified_attention",
    "rectified_mask",
    "rectified_plan",
    "row_outlier_count",
    "row_rectified_attention",
    "select_critical_blocks",
    "selection_width",
]


def rectified_attention(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                        config: PooledRectificationConfig | None = None, scale: float | None = None,
                        mask: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Rectified sparse attention on permuted ``[B, P, H, D]`` tensors, in either ``config.combine`` mode.

    ``"block"``: :func:`rectified_plan` through :func:`~dit_sparse.block_sparse_attention` (the epilogue runs in
    the kernel). ``"row"``: :func:`row_rectified_attention`, the plain sparse plan with the pooled key segment read
    in the kernel's softmax. ``mask`` as in :func:`rectified_plan`; ``backend`` as in the op. Returns the
    permuted output ``[B, P, H, D]`` in the input dtype.
    """
    config = PooledRectificationConfig() if config is None else config
    _check_config(config)
    if not config.per_row:
        plan = rectified_plan(q_perm, k_perm, v_perm, layout, config, scale, mask)
        return block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, backend=backend)
    scale = _check_scale(q_perm, scale)
    stats, _, mask = _stats_and_mask(q_perm, k_perm, v_perm, layout, config, scale, mask)
    return row_rectified_attention(q_perm, k_perm, v_perm, layout, mask, config, scale, stats=stats,
                                   backend=backend)
