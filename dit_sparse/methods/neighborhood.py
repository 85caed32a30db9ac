"""Neighborhood attention: sliding tile windows (STA / GNA) and token-level NATTEN windows on any grid.

Every video query attends a local 3-D window of the latent grid, plus every text token; text queries stay
dense. The plan does not depend on the data: it is static per (grid, tile, window) and cached.

Two ways to give the window (docs/neighborhood.md):

* **Tile windows** (``window``, the default): a window of ``(WT, WH, WW)`` whole tiles around each query tile
  (Sliding Tile Attention, arXiv 2502.04507; GNA, arXiv 2504.16922). Per axis ``a`` with ``n_a`` tiles::

      start_a = clamp(g_a - W_a // 2, 0, max(n_a - W_a, 0))
      key tile g' is on  iff  start_a <= g'_a < start_a + min(W_a, n_a)   on every axis

  A token's window is the window of its tile. Every (query tile, key tile) pair is fully on or fully off, so
  where every block is one tile (a grid of whole tiles, or ``TokenLayout(packing="tiled")``) the block plan is
  **exact**: the Triton kernel computes exactly this attention. On axes that are tile multiples this equals
  NATTEN with ``stride = tile`` and ``kernel_size = W * tile`` (odd ``W``). On a partial edge tile it does not:
  windows are counted in tiles, so a query near a ragged border sees fewer real tokens than the token-exact
  NATTEN window. With the default ``"packed"`` layout the tokens of partial edge tiles share blocks with other
  edge tiles: pairs involving such a packed block are **rounded up** like token windows (a superset: the
  queries of a packed block see the union of their windows); ``exact=True`` restores exactness there.

* **Token windows** (``kernel_size``, with ``stride``, ``dilation``, ``causal``): the per-axis NATTEN / GNA rule
  of docs/neighborhood.md#token-windows on tokens (:func:`dit_sparse.reference.neighborhood.natten_axis_allowed` is its
  brute-force form). Token windows do not line up with tiles, so the block plan is **rounded up to blocks**: it reads
  every block pair whose token bounding boxes (``layout.block_bbox``) hold at least one (query, key) pair the rule
  allows. On blocks that are tiles the box is the block's token set, so this is exactly "the blocks that hold an
  allowed pair, and no other"; on packed edge blocks the box is wider and the plan a (slightly larger) superset. The
  Triton kernel executes that block-rounded plan, which is a superset of the token window (queries also see the other
  keys of the blocks their window cuts). ``exact=True`` restores token exactness with an element mask
  (:func:`neighborhood_token_mask`); the kernel contract has no element mask, so ``exact=True`` currently runs on the
  torch path only (:func:`neighborhood_attention_exact`, which visits only the blocks of the plan). ``exact=True`` also
  applies to tile windows (only needed on packed edge blocks).

Everything works on permuted tensors (``layout.permute``: ``[B, P, H, D]``, video tiles first, then text
blocks) and block masks ``[B, H, N, N]`` over ``N = layout.num_blocks``; see :mod:`dit_sparse.methods.base`.

Example::

    layout = TokenLayout(frames=21, height=30, width=52, tile=(1, 16, 8))
    cfg = NeighborhoodConfig(window=(5, 3, 3))
    plan = neighborhood_plan(layout, cfg, device="cuda")          # cached; plan.density ~ 5/21 * 3/2 * 3/7
    out = dit_sparse.block_sparse_attention(layout.permute(q), layout.permute(k), layout.permute(v), plan)
    out = layout.unpermute(out)

Shapes: B batch, P padded sequence, H heads, D head dim, N blocks (``Nv`` video first, then text),
``Bs`` block size (tile volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._cache import tensor_cache
from ..layout import TokenLayout
from ..plan import SparsePlan
from .base import check_permuted, forced_mask, plan_from_mask

__all__ = [
    "NeighborhoodConfig",
    "neighborhood_mask",
    "neighborhood_plan",
    "neighborhood_token_mask",
    "neighborhood_attention_exact",
    "neighborhood_attention",
]

#: STA's default window in tiles (3x3x3 tiles of 6x8x8 tokens on HunyuanVideo) [ref]
DEFAULT_WINDOW = (3, 3, 3)
#: bytes of fp32 scores one chunk of the exact torch path may hold
_CHUNK_BYTES = 128 * 2**20


def _triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"NeighborhoodConfig.{name} must be an int or three ints (time, height, width), "
                     f"got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class NeighborhoodConfig:
    """Local window attention, in tiles (STA / GNA, default) or in tokens (NATTEN).

    Give either ``window`` (tile windows) or ``kernel_size`` (token windows), not both.

    Args:
        window (`tuple[int, int, int]` or `tuple[tuple[int, int, int], ...]`, *optional*): window in **tiles**
            ``(WT, WH, WW)``, odd on every axis; an int means the same on every axis. A tuple of triples gives
            one window per attention head (STA profiles per-head windows offline); masks and plans then carry
            a head dimension. A window at least as large as the tiles on an axis covers that whole axis.
            Defaults to ``(3, 3, 3)`` (STA) when ``kernel_size`` is not given.
        kernel_size (`tuple[int, int, int]`, *optional*): token-level window ``(kt, kh, kw)`` of
        docs/neighborhood.md#token-windows
            (NATTEN's ``kernel_size``). On an axis shorter than ``kernel_size * dilation`` (where NATTEN would
            raise) the window covers the whole dilation group, which is NATTEN's window in the limit.
        stride (`int` or `tuple[int, int, int]`, defaults to 1): GNA stride, ``1 <= stride <= kernel_size``
            (token windows only). ``stride = tile`` and ``kernel_size = W * tile`` is the tile window.
        dilation (`int` or `tuple[int, int, int]`, defaults to 1): NATTEN dilation (token windows only).
        causal (`bool`, defaults to False): causal along the time axis only (token windows only).
        exact (`bool`, defaults to False): False runs the block plan (a superset of the token window where it
            is rounded up to blocks) on any backend; True applies the token test (docs/neighborhood.md#token-windows,
            or the tile window of each token's tile) as an element mask, which runs on the torch path only
            (:func:`neighborhood_attention_exact`). Tile windows need it only on packed edge blocks.

    Example::

        NeighborhoodConfig()                                          # 3x3x3 tiles
        NeighborhoodConfig(window=((1, 3, 3), (3, 5, 5)))             # per-head windows, 2 heads
        NeighborhoodConfig(kernel_size=(5, 9, 9), stride=(1, 4, 4))   # GNA, block-rounded
        NeighborhoodConfig(kernel_size=(3, 7, 7), exact=True)         # token-exact NATTEN (torch path)
    """

    window: tuple | int | None = None
    kernel_size: tuple[int, int, int] | int | None = None
    stride: tuple[int, int, int] | int = 1
    dilation: tuple[int, int, int] | int = 1
    causal: bool = False
    exact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.causal, bool):
            raise ValueError(f"NeighborhoodConfig.causal must be a bool, got {self.causal!r}.")
        if not isinstance(self.exact, bool):
            raise ValueError(f"NeighborhoodConfig.exact must be a bool, got {self.exact!r}.")
        stride, dilation = _triple(self.stride, "stride"), _triple(self.dilation, "dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f"NeighborhoodConfig.stride and dilation must be >= 1, got stride={stride}, "
                             f"dilation={dilation}.")
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        if self.kernel_size is not None:
            if self.window is not None:
                raise ValueError(f"NeighborhoodConfig takes window (tiles) or kernel_size (tokens), got both: "
                                 f"window={self.window!r}, kernel_size={self.kernel_size!r}. Drop one.")
            kernel = _triple(self.kernel_size, "kernel_size")
            if min(kernel) < 1:
                raise ValueError(f"NeighborhoodConfig.kernel_size must be >= 1 on every axis, got {kernel}.")
            if any(s > k for s, k in zip(stride, kernel)):
                raise ValueError(f"NeighborhoodConfig.stride must satisfy 1 <= stride <= kernel_size on every "
                                 f"axis (GNA), got stride={stride}, kernel_size={kernel}.")
            object.__setattr__(self, "kernel_size", kernel)
            return
        # tile windows
        if stride != (1, 1, 1) or dilation != (1, 1, 1) or self.causal:
            raise ValueError(f"stride, dilation and causal apply to token windows (kernel_size) only, got "
                             f"stride={stride}, dilation={dilation}, causal={self.causal} with tile window "
                             f"{self.window!r}; give kernel_size=(kt, kh, kw) instead of window.")
        window = DEFAULT_WINDOW if self.window is None else self.window
        if isinstance(window, (tuple, list)) and len(window) > 0 and all(
                isinstance(w, (tuple, list)) for w in window):
            windows = tuple(_triple(w, "window") for w in window)
        else:
            windows = (_triple(window, "window"),)
        for w in windows:
            if min(w) < 1 or any(v % 2 == 0 for v in w):
                raise ValueError(f"NeighborhoodConfig.window must be odd and >= 1 on every axis (a centred "
                                 f"window of tiles), got {w}; use {tuple(v + 1 - v % 2 for v in w)}.")
        object.__setattr__(self, "window", windows[0] if len(windows) == 1 else windows)

    # ------------------------------------------------------------------ views
    @property
    def mode(self) -> str:
        """``"tile"`` (window in tiles, block-exact on tiles) or ``"token"`` (NATTEN window in tokens)."""
        return "tile" if self.kernel_size is None else "token"

    @property
    def windows(self) -> tuple[tuple[int, int, int], ...]:
        """Tile windows, one per head (a single entry broadcasts over heads). Empty for token windows."""
        if self.mode == "token":
            return ()
        return self.window if isinstance(self.window[0], tuple) else (self.window,)

    @property
    def num_heads(self) -> int:
        """Heads the masks carry: the number of per-head windows, or 1 (broadcast)."""
        return max(len(self.windows), 1)

    def nominal_density(self, layout: TokenLayout) -> float:
        """Video x video block density of tile windows, ``mean over heads of prod_a min(W_a, n_a) / n_a``.

        Token windows: ``prod_a min(k_a, L_a) / L_a`` (before rounding to blocks). Exact for tile windows on
        tile-multiple grids; padding tiles and text make :attr:`SparsePlan.density` differ slightly.
        """
        if self.mode == "token":
            return math.prod(min(k, n) / n for k, n in zip(self.kernel_size, layout.grid))
        n = layout.tiles_per_axis
        return sum(math.prod(min(w, m) / m for w, m in zip(win, n)) for win in self.windows) / self.num_heads


# ---------------------------------------------------------------------------------------------- per-axis rules
def _tile_axis(n: int, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """bool ``[Hw, n, n]``: key tile on for query tile, for window sizes ``windows`` ``[Hw]`` (tiles)."""
    g = torch.arange(n, device=device)
    w = windows.to(device).clamp(max=n).view(-1, 1, 1)
    start = (g.view(1, n, 1) - w // 2).clamp(min=0)
    start = torch.minimum(start, n - w)
    gk = g.view(1, 1, n)
    return (gk >= start) & (gk < start + w)


@tensor_cache(maxsize=256)
def _token_axis(length: int, kernel: int, stride: int, dilation: int, causal: bool, device: str) -> torch.Tensor:
    """bool ``[L, L]``: docs/neighborhood.md#token-windows per-axis rule, ``[query coordinate, key coordinate]``."""
    x = torch.arange(length, device=device)
    q, k = x.view(-1, 1), x.view(1, -1)
    group = q % dilation
    same = group == (k % dilation)
    qg, kg = q // dilation, k // dilation
    lg = (length - group + dilation - 1) // dilation  # tokens in the query's dilation group
    if causal:
        leader = torch.minimum((qg // stride) * stride + stride - 1, lg - 1)  # last query of the stride group
        on = (kg <= qg) & (leader - kg < kernel)
    else:
        keff = lg.clamp(max=kernel)  # a group shorter than the kernel is attended whole
        leader = torch.minimum((qg // stride) * stride + stride // 2, lg - 1)  # centre (right-hand for even s)
        start = torch.minimum((leader - keff // 2).clamp(min=0), lg - keff)  # windows shift inward at borders
        on = (kg >= start) & (kg < start + keff)
    return on & same


def _token_axes(layout: TokenLayout, config: NeighborhoodConfig, device: str) -> list[torch.Tensor]:
    causal = (config.causal, False, False)
    return [_token_axis(n, k, s, d, c, device) for n, k, s, d, c in
            zip(layout.grid, config.kernel_size, config.stride, config.dilation, causal)]


def _axis_rules(layout: TokenLayout, config: NeighborhoodConfig, device: str) -> list[torch.Tensor]:
    """Per-axis token rules bool ``[Hw, L_a, L_a]`` ``[query coordinate, key coordinate]``: the
    docs/neighborhood.md#token-windows rule (token windows, ``Hw = 1``) or the tile window of each coordinate's tile
    (tile windows, one per head)."""
    if config.mode == "token":
        return [r[None] for r in _token_axes(layout, config, device)]
    windows = torch.tensor(config.windows, dtype=torch.long)
    rules = []
    for a, (n, t, length) in enumerate(zip(layout.tiles_per_axis, layout.tile, layout.grid)):
        tile_rule = _tile_axis(n, windows[:, a], torch.device(device))  # [Hw, n, n]
        rules.append(tile_rule.repeat_interleave(t, 1).repeat_interleave(t, 2)[:, :length, :length])
    return rules


def _box_axis(rule: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Token rule ``[Hw, L, L]`` -> block rule ``[Hw, Nv, Nv]``: on iff the rule allows some (query, key) pair
    of coordinates in ``[lo_i, hi_i] x [lo_j, hi_j]`` (inclusive per-block ranges ``[Nv]``), by 2-D prefix sums.
    """
    hw, length = rule.shape[0], rule.shape[-1]
    cum = torch.zeros(hw, length + 1, length + 1, dtype=torch.int32, device=rule.device)
    cum[:, 1:, 1:] = rule.to(torch.int32).cumsum(1).cumsum(2)
    q0, q1 = lo.view(-1, 1), hi.view(-1, 1) + 1
    k0, k1 = lo.view(1, -1), hi.view(1, -1) + 1
    return (cum[:, q1, k1] - cum[:, q0, k1] - cum[:, q1, k0] + cum[:, q0, k0]) > 0


# ---------------------------------------------------------------------------------------------- block masks
@tensor_cache(maxsize=64)
def _cached_mask(layout: TokenLayout, config: NeighborhoodConfig, device: str) -> torch.Tensor:
    dev = torch.device(device)
    box = layout.block_bbox(dev)  # [Nv, 2, 3]: blocks are tiles (the box is the tile) or packed edge blocks
    video = None
    for a, rule in enumerate(_axis_rules(layout, config, device)):
        on = _box_axis(rule, box[:, 0, a], box[:, 1, a])  # [Hw, Nv, Nv]
        video = on if video is None else video & on
    nv = layout.num_video_blocks
    mask = forced_mask(layout, diagonal=False, device=dev).unsqueeze(0).repeat(video.shape[0], 1, 1)
    mask[:, :nv, :nv] |= video
    return mask.unsqueeze(0)  # [1, Hw, N, N]


def neighborhood_mask(layout: TokenLayout, config: NeighborhoodConfig,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool block mask of the neighborhood window, ``[1, 1, N, N]`` (``[1, H, N, N]`` for per-head windows).

    Video x video blocks follow the tile window (tile mode; exact on blocks that are tiles) or the blocks a token
    window touches (token mode, rounded up to blocks; packed edge blocks by their bounding boxes); text columns
    are on for every row and text rows are dense. The mask is static per (layout, config, device) and built once
    (cached); this returns a fresh copy, so it is safe to modify.

    Args:
        layout (`TokenLayout`): grid, tile and text of the attention call.
        config (`NeighborhoodConfig`): the window.
        device (`torch.device` or `str`, defaults to ``"cpu"``): where the mask lives.
    """
    _check_args(layout, config)
    return _cached_mask(layout, config, str(torch.device(device))).clone()


@tensor_cache(maxsize=64)
def _cached_plan(layout: TokenLayout, config: NeighborhoodConfig, device: str) -> SparsePlan:
    return plan_from_mask(_cached_mask(layout, config, device), layout)


def neighborhood_plan(layout: TokenLayout, config: NeighborhoodConfig,
                      device: torch.device | str = "cpu") -> SparsePlan:
    """The :class:`~dit_sparse.SparsePlan` of :func:`neighborhood_mask` over the permuted sequence (cached).

    The plan is shared between calls: do not modify its tensors in place. Its ``density`` is the achieved
    density (real tokens only, text included). For token windows with ``exact=True`` this is the block-rounded
    superset; run :func:`neighborhood_attention` (or :func:`neighborhood_attention_exact`) for exact results.
    """
    _check_args(layout, config)
    return _cached_plan(layout, config, str(torch.device(device)))


def _check_args(layout: TokenLayout, config: NeighborhoodConfig) -> None:
    if not isinstance(layout, TokenLayout):
        raise ValueError(f"layout must be a dit_sparse.TokenLayout, got {type(layout).__name__}.")
    if not isinstance(config, NeighborhoodConfig):
        raise ValueError(f"config must be a NeighborhoodConfig, got {type(config).__name__}.")


# ---------------------------------------------------------------------------------------------- token masks
@tensor_cache(maxsize=16)
def _slot_coords(layout: TokenLayout, device: str) -> torch.Tensor:
    """int64 ``[P, 3]``: ``(f, y, x)`` of video slots, ``-2`` for real text slots, ``-1`` for padding."""
    video = layout.slot_coords(device)
    text = torch.full((layout.num_text_blocks * layout.block_size, 3), -1, dtype=torch.long, device=device)
    text[: layout.text_tokens] = -2
    return torch.cat([video, text])


def _pair_mask(layout: TokenLayout, config: NeighborhoodConfig, q_slots: torch.Tensor,
               k_slots: torch.Tensor) -> torch.Tensor:
    """Element mask for slot index tensors -> bool ``[Hw, ...]``.

    ``q_slots`` and ``k_slots`` broadcast together to ``[1 or Hw, ...]`` (a leading head dim pairs with the
    per-head windows). Video query x video key: the window rule; video query x text key: on; text query x real
    key: on; padding slots (as query or key): off.
    """
    device = str(q_slots.device)
    coords = _slot_coords(layout, device)
    qc, kc = coords[q_slots], coords[k_slots]  # [..., 3]
    q_video, k_video = qc[..., 0] >= 0, kc[..., 0] >= 0
    q_text, k_text = qc[..., 0] == -2, kc[..., 0] == -2
    rules = _axis_rules(layout, config, device)  # [Hw, L, L] per axis
    hw = rules[0].shape[0]
    head = torch.arange(hw, device=device).view((hw,) + (1,) * (q_video.dim() - 1))
    on = q_video & k_video
    for a, rule in enumerate(rules):
        on = on & rule[head, qc[..., a].clamp(min=0), kc[..., a].clamp(min=0)]
    return on | (q_video & k_text) | (q_text & (k_video | k_text))


def neighborhood_token_mask(layout: TokenLayout, config: NeighborhoodConfig,
                            device: torch.device | str = "cpu", *,
                            query_slots: torch.Tensor | slice | None = None) -> torch.Tensor:
    """Token-exact element mask over permuted slots: bool ``[P, P]`` (``[H, P, P]`` for per-head windows).

    Entry ``[i, j]`` says whether the query in slot ``i`` attends the key in slot ``j``: the
    docs/neighborhood.md#token-windows token rule for token windows (what NATTEN computes), the tile window expanded to
    its tokens for tile windows; text keys on for every real query, text queries dense; padding slots off as queries
    and as keys.

    The full mask is ``P x P``: meant for tests and small grids. Pass ``query_slots`` (a slice or an index
    tensor) for a band of rows, ``[Pq, P]``.
    """
    _check_args(layout, config)
    dev = torch.device(device)
    keys = torch.arange(layout.padded_len, device=dev)
    if query_slots is None:
        rows = keys
    elif isinstance(query_slots, slice):
        rows = keys[query_slots]
    else:
        rows = query_slots.to(dev).long()
    mask = _pair_mask(layout, config, rows.view(1, -1, 1), keys.view(1, 1, -1))
    return mask[0] if config.num_heads == 1 else mask


# ---------------------------------------------------------------------------------------------- attention
@tensor_cache(maxsize=64)
def _video_row_width(layout: TokenLayout, config: NeighborhoodConfig, device: str) -> int:
    """Most key blocks of a video query block row of the (cached, static) plan, at least 1: the gather width of
    :func:`neighborhood_attention_exact`. A function of the layout and the window only, so it is read on the host
    once per (layout, window, device) and never again (no sync per call)."""
    plan = _cached_plan(layout, config, device)
    return max(int(plan.kv_num_blocks[0, :, : layout.num_video_blocks].max()), 1)


def neighborhood_attention_exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 layout: TokenLayout, config: NeighborhoodConfig, *, scale: float | None = None,
                                 return_lse: bool = False):
    """Token-exact neighborhood attention on permuted tensors (torch path, any device).

    Each video query block visits only the key blocks of :func:`neighborhood_plan` (gathered, chunked over query
    blocks: scores take about ``B * H * Bs * K * Bs`` floats per query block, K = key blocks per row, never
    ``P x P``) and masks every key outside its token window (:func:`neighborhood_token_mask`). Text query rows
    attend every real key. Computes in float32 (float64 for float64 inputs). This is a reference-speed path;
    the Triton kernel has no element mask yet.

    Args:
        query, key, value (`torch.Tensor`): permuted ``[B, P, H, D]`` (``layout.permute``).
        layout (`TokenLayout`): the layout they were permuted with.
        config (`NeighborhoodConfig`): any window (tile windows give the same result as the block plan).
        scale (`float`, *optional*): softmax scale, defaults to ``1 / sqrt(D)``.
        return_lse (`bool`, defaults to False): also return the natural-log LSE ``[B, H, P]``.

    Returns:
        ``out [B, P, H, D]`` in the input dtype (padding rows are 0 with ``lse = -inf``), or ``(out, lse)``.
    """
    _check_args(layout, config)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_permuted(t, layout, name)
    bsz, plen, heads, dim = query.shape
    if key.shape[:3] != query.shape[:3] or value.shape[:3] != query.shape[:3] or key.shape[-1] != dim:
        raise ValueError(f"Shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}; expected [B, P, H, D] for all three (value may differ in D).")
    hw = config.num_heads
    if hw not in (1, heads):
        raise ValueError(f"config has {hw} per-head windows but the tensors have {heads} heads.")
    device = query.device
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    bs, nv = layout.block_size, layout.num_video_blocks
    q, k, v = query, key, value  # cast per gathered chunk, never whole tensors
    out = torch.zeros(bsz, plen, heads, value.shape[-1], dtype=cdtype, device=device)
    lse = torch.full((bsz, heads, plen), float("-inf"), dtype=cdtype, device=device)

    plan = neighborhood_plan(layout, config, device)
    num = plan.kv_num_blocks[0, :, :nv].long()  # [Hw, Nv]
    width = _video_row_width(layout, config, str(torch.device(device)))
    idx = plan.kv_indices[0, :, :nv, :width].long()  # [Hw, Nv, K]
    live = torch.arange(width, device=device) < num.unsqueeze(-1)
    idx = torch.where(live, idx, torch.zeros_like(idx))
    offs = torch.arange(bs, device=device)

    def attend(rows: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> None:
        """rows [c, r] query slots, keys [Hk, c, m] key slots, allowed [Hw, c, r, m] -> fills out / lse."""
        qc = q[:, rows].to(cdtype)  # [B, c, r, H, D]
        if keys.shape[0] == 1:
            kc, vc = k[:, keys[0]].to(cdtype), v[:, keys[0]].to(cdtype)  # [B, c, m, H, D]
            s = torch.einsum("bcrhd,bcmhd->bhcrm", qc, kc) * scale
        else:  # per-head key sets
            hsel = torch.arange(heads, device=device).view(heads, 1, 1)
            kc, vc = k[:, keys, hsel].to(cdtype), v[:, keys, hsel].to(cdtype)  # [B, H, c, m, D]
            s = torch.einsum("bcrhd,bhcmd->bhcrm", qc, kc) * scale
        s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        if keys.shape[0] == 1:
            o = torch.einsum("bhcrm,bcmhd->bcrhd", p, vc)
        else:
            o = torch.einsum("bhcrm,bhcmd->bcrhd", p, vc)
        o = o / torch.where(den > 0, den, torch.ones_like(den)).permute(0, 2, 3, 1, 4)
        flat = rows.reshape(-1)
        out[:, flat] = o.reshape(bsz, -1, heads, o.shape[-1])
        lse[:, :, flat] = torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf"))
                                      ).reshape(bsz, heads, -1)

    # video query blocks: only the key blocks of the plan, element-masked
    itemsize = torch.finfo(cdtype).bits // 8
    per_block = max(bsz * heads * bs * width * bs * itemsize * 3, 1)
    chunk = max(1, _CHUNK_BYTES // per_block)
    for m0 in range(0, nv, chunk):
        m1 = min(m0 + chunk, nv)
        rows = torch.arange(m0 * bs, m1 * bs, device=device).view(m1 - m0, bs)  # [c, Bs]
        keys = (idx[:, m0:m1, :, None] * bs + offs).reshape(hw, m1 - m0, width * bs)  # [Hw, c, K*Bs]
        allowed = _pair_mask(layout, config, rows.view(1, m1 - m0, bs, 1), keys.view(hw, m1 - m0, 1, -1))
        allowed = allowed & live[:, m0:m1].repeat_interleave(bs, -1).view(hw, m1 - m0, 1, width * bs)
        attend(rows, keys, allowed)

    # text query slots: dense over every real key
    all_keys = torch.arange(plen, device=device)
    rows_per_chunk = max(1, _CHUNK_BYTES // max(bsz * heads * plen * itemsize * 3, 1))
    for r0 in range(nv * bs, plen, rows_per_chunk):
        rows = torch.arange(r0, min(r0 + rows_per_chunk, plen), device=device).view(1, -1)
        allowed = _pair_mask(layout, config, rows.view(1, 1, -1, 1), all_keys.view(1, 1, 1, -1))  # [Hw,1,r,P]
        attend(rows, all_keys.view(1, 1, -1), allowed)

    out = out.to(query.dtype)
    if return_lse:
        return out, lse if cdtype == torch.float64 else lse.float()
    return out


def neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                           config: NeighborhoodConfig, *, scale: float | None = None, return_lse: bool = False,
                           backend: str | None = None):
    """Neighborhood attention on permuted ``[B, P, H, D]`` tensors, dispatched on ``config.exact``.

    ``exact=False``: :func:`dit_sparse.block_sparse_attention` with :func:`neighborhood_plan` (any backend;
    block-exact for tile windows on tiles, block-rounded for token windows and packed edge blocks). ``exact=True``:
    :func:`neighborhood_attention_exact` (torch path; ``backend`` must be None or ``"torch"``).

    Returns ``out [B, P, H, D]``, or ``(out, lse [B, H, P])`` with ``return_lse``.
    """
    if config.exact:
        if backend not in (None, "torch"):
            raise NotImplementedError(f"NeighborhoodConfig(exact=True) runs on the torch path only (the kernel "
                                      f"contract has no element mask), got backend={backend!r}; pass "
                                      f"backend=None, or exact=False for the block-rounded plan.")
        return neighborhood_attention_exact(query, key, value, layout, config, scale=scale,
                                            return_lse=return_lse)
    from ..ops import block_sparse_attention

    plan = neighborhood_plan(layout, config, query.device)
    return block_sparse_attention(query, key, value, plan, scale=scale, return_lse=return_lse, backend=backend)
