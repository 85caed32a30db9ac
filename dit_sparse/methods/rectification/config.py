"""The configuration of pooled rectification and the argument checks every part shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...layout import TokenLayout
from ..base import check_share, keep_blocks, share_blocks

__all__ = ["COMBINE_MODES", "PooledRectificationConfig", "ROW_KEYS"]

#: ``"block"``: reference per-query-block epilogue; ``"row"``: pooled keys of the skipped blocks in each row's softmax
COMBINE_MODES = ("block", "row")

#: how a skipped block enters the per-row softmax (``combine="row"``): ``"mean"``, one pooled key (mean key and
#: value, weight n_j); ``"outlier"``, its ``row_outliers`` most deviating keys exactly plus one pooled key for the
#: other n_j - row_outliers
ROW_KEYS = ("mean", "outlier")


@dataclass(frozen=True, kw_only=True)
class PooledRectificationConfig:
    """Configuration of pooled rectification (Rectified SpaAttn). Defaults follow the reference code.

    Args:
        sparsity (`float`, defaults to 0.8): target fraction of video x video block pairs skipped
            (reference ``sa_drop_rate``). Sets the top-k floor ``ceil((1 - sparsity) * Nv)`` of kept key entries
            per query block (see :meth:`top_k`). In ``[0, 1]``; 0 keeps every block.
        top_p (`float`, defaults to 0.3): top-p mass (reference ``p_remain_rates``): per query block keep the fewest
            highest-``P̃`` entries whose cumulative mass exceeds ``top_p`` (then at least the top-k floor). In
            ``[0, 1]``.
        neighbours (`bool`, defaults to True): always keep the 3-D tile neighbours of each query tile (tile
            coordinates differing by <= 1 on every axis; 27 including itself in the interior; packed edge blocks by
            their bounding boxes, see :func:`neighbour_mask`).
        neighbour_share (`float` or None, defaults to None): cap the forced neighbours at
            ``floor(neighbour_share * top_k)`` blocks per row, the nearest first (the block itself, then by box
            centre distance: :func:`~dit_sparse.methods.base.nearest_adjacent_blocks`), so they take at most that
            share of the top-k budget and the selection picks the rest. ``None`` (the reference): every 3-D
            neighbour (27 per interior row, 52% of a Wan 480p 80% budget; more than a 90% budget at FLUX 1024^2).
            Ours. In ``(0, 1]``.
        gapr (`bool`, defaults to True): compensate a dropped block only where its pooled estimate is reliable
            (``G_ij > E_ij``). ``False`` is the paper's "naive" rectification: every dropped block is compensated.
        first_frame_dense (`bool`, defaults to False): Wan rule ``mask[:ff, :ff] = True``: the blocks holding
            latent frame 0 read each other fully (only when ``frames > 1``; it is not a global sink).
        rectify (`bool`, defaults to True): attach the epilogue ``(R, c)`` to the plan. ``False`` keeps only the
            selection (plain block-sparse attention on the same blocks).
        combine (`str`, defaults to ``"block"``): how the pooled estimate meets the sparse output.
            ``"block"`` is the reference: ``O_u = R_i * SparseAttn_u + c_i`` with ``R``, ``c`` per query block in the
            kernel epilogue. ``"row"`` [ours] keeps the exact softmax normalisation of the blocks read and pools
            only the skipped ones, per query row: one softmax over the exact logits of the read keys and the pooled
            logits ``q_u · k̄_j * scale + log n_j`` of the skipped reliable blocks (values ``v̄_j``), read by the
            kernel in the same online softmax, one pass (:func:`pooled_segment`; the two-pass LSE merge,
            :func:`pooled_remainder` + :func:`merge_partials`, is kept as a cross-check). GAPR per row compares
            ``|q_u · k̄_j|`` with ``|q_u · b_j|``.
        row_keys (`str`, defaults to ``"outlier"``): with ``combine="row"``, how a skipped block enters the softmax.
            ``"mean"``: one pooled key (``k̄_j``, ``v̄_j``, weight ``n_j``), gated by GAPR per row when ``gapr``.
            ``"outlier"`` [ours; the sharp-attention safeguard]: the block's ``row_outliers`` most
            deviating keys (largest ``||k_t - k̄_j||``, lowest slot on ties) exactly, with their own values, plus
            one pooled key for the other ``n_j - row_outliers`` tokens (a block of ``n_j <= row_outliers`` real
            tokens enters wholly exactly, no pooled key); no gate (``gapr`` is ignored). A block mean hides an
            isolated bright key and a row's remainder then over-weights the dark field; the exact outliers restore
            it (measured in ``benchmarks/row_safeguard.py`` and ``benchmarks/pooled_peers.py``).
        row_outliers (`int`, defaults to 2): with ``row_keys="outlier"``, how many most deviating keys of each
            skipped block are kept exactly (``>= 1``; the segment then holds ``(row_outliers + 1) * Nv`` keys).
            Ignored by ``row_keys="mean"`` (like ``gapr`` by ``"outlier"``). 2 is the smallest count never worse
            than the selection alone on the structured families at 16- and 128-token blocks and on the embedded
            model's attention (1 is worse at 128-token blocks, where a block can hold several bright keys;
            ``python benchmarks/row_safeguard.py --outliers``).

    Example::

        config = PooledRectificationConfig(sparsity=0.85)
        plain = dataclasses.replace(config, rectify=False)
    """

    sparsity: float = 0.8
    top_p: float = 0.3
    neighbours: bool = True
    neighbour_share: float | None = None
    gapr: bool = True
    first_frame_dense: bool = False
    rectify: bool = True
    combine: str = "block"
    row_keys: str = "outlier"
    row_outliers: int = 2

    def __post_init__(self) -> None:
        for name in ("sparsity", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise ValueError(f"PooledRectificationConfig.{name} must be a number in [0, 1], got {v!r}.")
            object.__setattr__(self, name, float(v))
        for name in ("neighbours", "gapr", "first_frame_dense", "rectify"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"PooledRectificationConfig.{name} must be a bool, got {v!r} "
                                 f"({type(v).__name__}).")
        object.__setattr__(self, "neighbour_share", check_share(
            self.neighbour_share, "PooledRectificationConfig", "neighbour_share",
            "e.g. neighbour_share=0.25 (the nearest neighbours, a quarter of the top-k budget), or None for all"))
        if self.row_keys not in ROW_KEYS:
            raise ValueError(f"PooledRectificationConfig.row_keys must be one of {ROW_KEYS}, got {self.row_keys!r}.")
        v = self.row_outliers
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"PooledRectificationConfig.row_outliers must be an int >= 1 (exact keys per skipped "
                             f"block with row_keys='outlier'), got {v!r}.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"PooledRectificationConfig.combine must be one of {COMBINE_MODES}, got "
                             f"{self.combine!r}.")

    @property
    def per_row(self) -> bool:
        """True when the correction is per row (``rectify`` and ``combine="row"``): a pooled key segment read in the
        kernel's softmax (:func:`pooled_segment`) instead of the plan's epilogue."""
        return self.rectify and self.combine == "row"

    def neighbour_count(self, num_video_blocks: int) -> int | None:
        """Forced neighbours per row under ``neighbour_share`` (``floor(share * top_k)``), None when uncapped."""
        if self.neighbour_share is None:
            return None
        return share_blocks(self.top_k(num_video_blocks), self.neighbour_share)

    def top_k(self, num_video_blocks: int) -> int:
        """The top-k floor ``ceil((1 - sparsity) * num_video_blocks)``: the budget rule every method shares
        (:func:`~dit_sparse.methods.base.keep_blocks`; the reference floors, ``int(...)``, so at sparsity 0.9 on 64
        blocks it keeps 6 where draft keeps 7: ours keeps 7 in both)."""
        return keep_blocks(num_video_blocks, self.sparsity)


def _check_scale(q_perm: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q_perm.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (the model's softmax scale), got {scale!r}.")
    return float(scale)


def _check_config(config) -> None:
    if not isinstance(config, PooledRectificationConfig):
        raise ValueError(f"config must be a PooledRectificationConfig, got {type(config).__name__}.")


def _normalise_mask(mask: torch.Tensor, layout: TokenLayout, device) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a torch.bool block mask [B, H, N, N], got {got}; convert with mask.bool().")
    if mask.dim() == 2:
        mask = mask[None, None]
    n = layout.num_blocks
    if mask.dim() != 4 or mask.shape[-2:] != (n, n):
        raise ValueError(f"mask must be [B, H, N={n}, N={n}] (or [N, N]) for {layout!r}, got {tuple(mask.shape)}.")
    return mask.to(device)
