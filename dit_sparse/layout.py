"""``TokenLayout``: the token permutation of a latent video grid (plus text) into kernel blocks, for any grid.

Every method needs "one kernel block = one spatially compact group of tokens". A layout cuts the latent grid
``(frames, height, width)`` (in patch tokens, raster order ``f*H*W + y*W + x``) into tiles ``(tT, tH, tW)`` of
``block_size = tT*tH*tW`` tokens. Two packings (docs/layout.md#packings):

* ``"packed"`` (the default): every **complete** tile is one block, in raster tile order, as before. The real
  tokens of the partial edge tiles (where an axis is not a tile multiple) follow, tile after tile in raster tile
  order (raster order inside each tile), cut into full blocks of ``block_size``: only the last video block can
  be partial. Video padding is below one block whatever the grid.
* ``"tiled"``: every tile is one block, padded to ``block_size``; a partial edge tile holds its real tokens first
  (raster order inside the tile) and padding slots last. Pads up to 13-24% on grids like 21x30x52.

Both keep the real tokens of a block at its start, so a block's key validity is one count (``block_valid``).
Text tokens always follow the video blocks in the permuted sequence, whatever the model's order, as
``ceil(text_tokens / block_size)`` blocks. A block's coordinates are the bounding box of its tokens
(``block_bbox``): a tile's own box for a complete tile, a wider box for a packed block.

Shapes: S = ``seq_len`` (model order, video + text), P = ``padded_len`` (permuted, whole blocks).

Example::

    layout = TokenLayout(frames=21, height=30, width=52)          # Wan2.1 480p: tile (4, 4, 8), 256 blocks
    qp = layout.permute(q)                                      # [B, S, H, D] -> [B, P, H, D]
    q_back = layout.unpermute(qp)                               # exact inverse
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from ._cache import tensor_cache

__all__ = ["TokenLayout", "pick_tile"]

DEFAULT_BLOCK_SIZE = 128
#: largest allowed ratio between the two spatial tile sides (and between time and space) for picked tiles
MAX_ASPECT = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


PACKINGS = ("packed", "tiled")


def _check_packing(packing, owner: str = "pick_tile") -> None:
    if not isinstance(packing, str) or packing not in PACKINGS:
        raise ValueError(f"{owner}.packing: got {packing!r}, expected one of {PACKINGS}; fix: packing='packed' "
                         "(default) or 'tiled'.")


def pick_tile(frames: int, height: int, width: int, block_size: int = DEFAULT_BLOCK_SIZE,
              packing: str = "packed") -> tuple[int, int, int]:
    """The compact tile of volume ``block_size`` that suits the grid best.

    Candidates are power-of-two sides with spatial aspect ratio <= ``MAX_ASPECT`` and ``tT <= 4``; images
    (``frames == 1``) get ``tT = 1``. ``"tiled"`` picks the tile that pads least (Wan2.1 480p, 21x30x52:
    (1, 16, 8) pads 13% where Draft's (1, 8, 16) pads 24%). ``"packed"`` pads less than one block with any tile,
    so it picks the tile that leaves the fewest tokens to the packed edge blocks (the most tokens in complete,
    compact tiles). Ties go to the squarer tile, then to the shorter time side.
    """
    _check_packing(packing)
    if block_size & (block_size - 1):
        raise ValueError(f"pick_tile needs a power-of-two block_size, got {block_size}; pass tile=(tT, tH, tW).")
    pows = [2**i for i in range(block_size.bit_length())]
    best, best_key = None, None
    for tt, th in itertools.product(pows, pows):
        if block_size % (tt * th):
            continue
        tw = block_size // (tt * th)
        if tt > 4 or (frames == 1 and tt > 1) or max(th, tw) > MAX_ASPECT * min(th, tw):
            continue
        if packing == "tiled":
            cost = _cdiv(frames, tt) * tt * _cdiv(height, th) * th * _cdiv(width, tw) * tw
        else:  # tokens outside complete tiles
            cost = frames * height * width - (frames // tt) * tt * (height // th) * th * (width // tw) * tw
        key = (cost, max(th, tw) / min(th, tw), tt)
        if best_key is None or key < best_key:
            best, best_key = (tt, th, tw), key
    if best is None:  # tiny block sizes: fall back to a flat spatial tile
        best = (1, 1, block_size)
    return best


@dataclass(frozen=True)
class TokenLayout:
    """Latent grid + text tokens -> tile-ordered, block-padded token sequence.

    Args:
        frames, height, width (`int`): latent grid in patch tokens (images: ``frames=1``).
        text_tokens (`int`, defaults to 0): text tokens in the same attention call.
        text_position (`str`, defaults to ``"after"``): where the model puts them, ``"before"`` (CogVideoX, Flux)
            or ``"after"`` (HunyuanVideo, SD3) the video tokens.
        tile (`tuple[int, int, int]`, *optional*): ``(tT, tH, tW)``; its volume is the block size. Defaults to
            :func:`pick_tile` for ``block_size``.
        block_size (`int`, defaults to 128): tokens per block when ``tile`` is picked.
        packing (`str`, defaults to ``"packed"``): ``"packed"`` (complete tiles one block each, then the edge
            tiles' tokens packed into full blocks: less than one block of video padding) or ``"tiled"`` (every
            tile one block, partial edge tiles padded).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "after"
    tile: tuple[int, int, int] | None = None
    block_size: int = field(default=DEFAULT_BLOCK_SIZE)
    packing: str = "packed"

    def __post_init__(self) -> None:
        _check_packing(self.packing, "TokenLayout")
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TokenLayout.{name} must be a positive int (patch tokens), got {v!r}.")
        if not isinstance(self.text_tokens, int) or isinstance(self.text_tokens, bool) or self.text_tokens < 0:
            raise ValueError(f"TokenLayout.text_tokens must be an int >= 0, got {self.text_tokens!r}.")
        if self.text_position not in ("before", "after"):
            raise ValueError(f"TokenLayout.text_position must be 'before' or 'after', got {self.text_position!r}.")
        if self.tile is None:
            bs = self.block_size
            if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1 or bs & (bs - 1):
                raise ValueError(f"TokenLayout.block_size: got {bs!r}, expected a power of two (tokens per block) "
                                 "when the tile is picked; fix: e.g. block_size=128, or give tile=(tT, tH, tW).")
            object.__setattr__(self, "tile", pick_tile(self.frames, self.height, self.width,
                                                         self.block_size, self.packing))
        t = self.tile
        if not (isinstance(t, (tuple, list)) and len(t) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t)):
            raise ValueError(f"TokenLayout.tile must be three positive ints (tT, tH, tW), got {t!r}; fix: e.g. "
                             "tile=(1, 8, 16), or tile=None to pick one.")
        tile = tuple(t)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "block_size", tile[0] * tile[1] * tile[2])

    # ------------------------------------------------------------------ sizes
    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tiles_per_axis(self) -> tuple[int, int, int]:
        """``(nT, nH, nW)``: tiles along each axis after padding."""
        return tuple(_cdiv(g, t) for g, t in zip(self.grid, self.tile))

    @property
    def num_video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_complete_tiles(self) -> int:
        """Tiles with no padding slot (every tile of a tile-multiple grid)."""
        (f, h, w), (a, b, c) = self.grid, self.tile
        return (f // a) * (h // b) * (w // c)  # plain arithmetic: torch.compile traces it (not math.prod(genexpr))

    @property
    def num_packed_blocks(self) -> int:
        """Video blocks that are not one complete tile: packed edge blocks (``"packed"``) or partial tiles."""
        return self.num_video_blocks - self.num_complete_tiles

    @property
    def num_video_blocks(self) -> int:
        if self.packing == "tiled":
            nt, nh, nw = self.tiles_per_axis
            return nt * nh * nw
        rest = self.num_video_tokens - self.num_complete_tiles * self.block_size
        return self.num_complete_tiles + _cdiv(rest, self.block_size)

    @property
    def num_text_blocks(self) -> int:
        return _cdiv(self.text_tokens, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def seq_len(self) -> int:
        """Tokens in model order (video + text)."""
        return self.num_video_tokens + self.text_tokens

    @property
    def padded_len(self) -> int:
        """Slots in the permuted sequence (whole blocks)."""
        return self.num_blocks * self.block_size

    @property
    def padding_fraction(self) -> float:
        """Padding slots over all slots, ``1 - seq_len / padded_len`` (video and text padding)."""
        return 1.0 - self.seq_len / self.padded_len

    # ------------------------------------------------------------------ cached index tensors
    def indices(self, device: torch.device | str = "cpu") -> _LayoutIndices:
        """Index tensors on ``device`` (cached per layout and device)."""
        return _build_indices(self.grid, self.tile, self.text_tokens, self.text_position, self.packing,
                              str(torch.device(device)))

    def block_valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 ``[num_blocks]``: real tokens at the start of each block."""
        return self.indices(device).block_valid

    def tile_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_video_blocks, 3]``: tile coordinates ``(a, b, c)`` of each video block.

        Only for layouts where every video block is one tile (``"tiled"``, or a grid of whole tiles); packed
        edge blocks have no tile, use :meth:`block_bbox`.
        """
        if self.num_video_blocks != math.prod(self.tiles_per_axis):
            raise ValueError(f"{self!r} packs its partial edge tiles into {self.num_packed_blocks} blocks that are "
                             f"not tiles; use layout.block_bbox() (token bounding boxes) or packing='tiled'.")
        return self.indices(device).tile_coords

    def block_bbox(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_video_blocks, 2, 3]``: inclusive bounding box of each video block's real tokens,
        ``[:, 0] = (f, y, x)`` minimum and ``[:, 1]`` maximum. A complete tile's box is the tile itself."""
        return self.indices(device).bbox

    def block_is_tile(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool ``[num_video_blocks]``: the block holds exactly the real tokens of one tile (complete, or a
        partial tile of a ``"tiled"`` layout), so coordinate rules on tiles are exact on it."""
        return self.indices(device).is_tile

    def slot_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_video_blocks * block_size, 3]``: ``(f, y, x)`` of each video slot (-1 for padding)."""
        return self.indices(device).slot_coords

    # ------------------------------------------------------------------ permutation
    def _check_seq(self, x: torch.Tensor, expected: int, what: str) -> None:
        if x.dim() not in (3, 4):
            raise ValueError(f"TokenLayout.{what} expects [B, S, H, D] or [B, S, C], got shape {tuple(x.shape)}.")
        if x.shape[1] != expected:
            raise ValueError(f"TokenLayout.{what}: sequence axis has {x.shape[1]} tokens, expected {expected} for "
                             f"{self!r}; build a TokenLayout for this grid and text length.")

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Model order ``[B, S, ...]`` -> tile order ``[B, P, ...]``; padding slots are zero."""
        self._check_seq(x, self.seq_len, "permute")
        inv = self.indices(x.device).inverse
        out = x.new_zeros((x.shape[0], self.padded_len) + tuple(x.shape[2:]))
        return out.index_copy_(1, inv, x)

    def unpermute(self, x: torch.Tensor) -> torch.Tensor:
        """Tile order ``[B, P, ...]`` -> model order ``[B, S, ...]`` (padding slots dropped). Exact inverse."""
        self._check_seq(x, self.padded_len, "unpermute")
        return x.index_select(1, self.indices(x.device).inverse)

    def __repr__(self) -> str:
        text = f", text={self.text_tokens} {self.text_position}" if self.text_tokens else ""
        pack = "" if self.packing == "packed" else ", tiled"
        return (f"TokenLayout(grid={self.frames}x{self.height}x{self.width}{text}, tile={self.tile}{pack}, "
                f"blocks={self.num_video_blocks}+{self.num_text_blocks}, padding={self.padding_fraction:.1%})")


@dataclass(frozen=True)
class _LayoutIndices:
    perm: torch.Tensor  # int64 [P]: model-order index of each slot, -1 for padding
    inverse: torch.Tensor  # int64 [S]: slot of each model-order token
    block_valid: torch.Tensor  # int32 [num_blocks]
    tile_coords: torch.Tensor  # int64 [n_tiles, 3] (raster tile order; the video blocks of a tiled layout)
    slot_coords: torch.Tensor  # int64 [n_video_blocks * Bs, 3], -1 for padding
    bbox: torch.Tensor  # int64 [n_video_blocks, 2, 3]: inclusive (min, max) of (f, y, x) over real tokens
    is_tile: torch.Tensor  # bool [n_video_blocks]


def _edge_order(a, b, c, partial, grid, tile) -> torch.Tensor:
    """Order of the partial tiles (``partial`` [n_tiles] bool, tiles in raster order) along a path that keeps
    consecutive tiles adjacent: slab by slab in time; inside a slab down the right edge column, then right to left
    along the bottom edge row (an L), reversed in every other slab so that each slab starts where the previous
    one ended; a slab of only partial tiles (a partial time edge) in boustrophedon raster order."""
    nt, nh, nw = (-(-g // t) for g, t in zip(grid, tile))
    a, b, c = (t.reshape(-1)[partial] for t in (a, b, c))
    w_partial = grid[2] % tile[2] != 0
    slab_all = (a == nt - 1) & (grid[0] % tile[0] != 0)
    snake = b * nw + torch.where(b % 2 == 0, c, nw - 1 - c)
    ell = torch.where(w_partial & (c == nw - 1), b, nh + (nw - 1 - c))
    pos = torch.where(slab_all, snake, ell)
    pos = torch.where(a % 2 == 1, -pos, pos)
    return torch.argsort(a * (2 * nh * nw + 2) + pos, stable=True)


@tensor_cache(maxsize=64)
def _build_indices(grid, tile, text_tokens, text_position, packing, device) -> _LayoutIndices:
    (T, Hg, Wg), (tt, th, tw) = grid, tile
    bs = tt * th * tw
    nt, nh, nw = _cdiv(T, tt), _cdiv(Hg, th), _cdiv(Wg, tw)
    # coordinates of every (tile, in-tile offset) pair, tiles and offsets both in raster order
    a, b, c = torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), indexing="ij")
    dt, dy, dx = torch.meshgrid(torch.arange(tt), torch.arange(th), torch.arange(tw), indexing="ij")
    f = (a.reshape(-1, 1) * tt + dt.reshape(1, -1))
    y = (b.reshape(-1, 1) * th + dy.reshape(1, -1))
    x = (c.reshape(-1, 1) * tw + dx.reshape(1, -1))
    real = (f < T) & (y < Hg) & (x < Wg)  # [n_tiles, bs]
    # valid-first inside each tile, keeping raster order among the real tokens
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
    real = real.gather(1, order)
    f, y, x = (t.gather(1, order) for t in (f, y, x))
    is_tile = torch.ones(real.shape[0], dtype=torch.bool)
    if packing == "packed":
        complete = real.all(1)
        part = torch.nonzero(~complete).squeeze(1)[_edge_order(a, b, c, ~complete, (T, Hg, Wg), tile)]
        n_part = int(real[part].sum())  # the real tokens of the partial tiles, tile after tile
        n_pb = _cdiv(n_part, bs)
        pad = n_pb * bs - n_part

        def packed(t: torch.Tensor) -> torch.Tensor:
            flat = torch.cat([t[part][real[part]], t.new_zeros(pad)])  # partial tiles in path order
            return torch.cat([t[complete], flat.view(n_pb, bs)])

        f, y, x = packed(f), packed(y), packed(x)
        tile_real = real.sum(1)
        real = torch.cat([real[complete], (torch.arange(n_pb * bs) < n_part).view(n_pb, bs)])
        # a block is one tile iff all its real tokens share the first one's tile and that tile has no others
        tid = ((f // tt) * nh + y // th) * nw + x // tw
        same = torch.where(real, tid == tid[:, :1], torch.ones_like(real)).all(1)
        is_tile = same & (real.sum(1) == tile_real[tid[:, 0]])
    video_off = text_tokens if text_position == "before" else 0
    text_off = 0 if text_position == "before" else T * Hg * Wg
    vid = torch.where(real, video_off + f * Hg * Wg + y * Wg + x, torch.full_like(f, -1)).reshape(-1)
    n_tb = _cdiv(text_tokens, bs)
    txt = torch.full((n_tb * bs,), -1, dtype=torch.long)
    txt[:text_tokens] = text_off + torch.arange(text_tokens)
    perm = torch.cat([vid, txt])
    slots = torch.nonzero(perm >= 0).squeeze(1)
    inverse = torch.empty(T * Hg * Wg + text_tokens, dtype=torch.long)
    inverse[perm[slots]] = slots
    text_valid = torch.clamp(text_tokens - torch.arange(n_tb) * bs, max=bs)
    block_valid = torch.cat([real.sum(1), text_valid]).to(torch.int32)
    tile_coords = torch.stack([a.reshape(-1), b.reshape(-1), c.reshape(-1)], 1)
    coords = torch.stack([f, y, x], -1)  # [nv, bs, 3]
    big = max(T, Hg, Wg)
    lo = torch.where(real.unsqueeze(-1), coords, torch.full_like(coords, big)).amin(1)
    hi = torch.where(real.unsqueeze(-1), coords, torch.full_like(coords, -1)).amax(1)
    bbox = torch.stack([lo, hi], 1)
    coords = torch.where(real.reshape(-1, 1), coords.reshape(-1, 3), torch.full_like(coords.reshape(-1, 3), -1))
    dev = torch.device(device)
    return _LayoutIndices(perm.to(dev), inverse.to(dev), block_valid.to(dev), tile_coords.to(dev), coords.to(dev),
                          bbox.to(dev), is_tile.to(dev))
