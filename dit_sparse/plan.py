"""``SparsePlan``: which key blocks every query block reads, plus an optional output correction.

A plan is the one currency between the four methods and the attention op, in the spirit of
``torch.nn.attention.flex_attention.BlockMask``:

* the sequence of queries is cut into query blocks of ``block_q`` tokens and the keys into key blocks of
  ``block_k`` tokens (the last block of each may be partial: ``seq_q`` / ``seq_k`` give the true lengths);
* for every (batch, head, query block) the plan lists the key blocks to read as a CSR row:
  ``kv_num_blocks[b, h, m]`` entries of ``kv_indices[b, h, m, :]``, sorted ascending (entries past the count
  are padding and never read). The width of ``kv_indices`` is fixed (``Mk`` from :meth:`SparsePlan.from_dense`,
  as in flex's ``BlockMask``), so building a plan never reads a count back to the host (no device sync);
* ``kv_block_valid[n]`` (optional) says how many leading tokens of key block ``n`` are real; the rest are
  padding slots of a :class:`~dit_sparse.layout.TokenLayout` and are masked as keys;
* an optional epilogue ``out = out_scale * attention_restricted_to_plan + out_bias``, where ``out_scale`` is
  per query row ``[B, H, seq_q]`` or per query block ``[B, H, Mq]`` and ``out_bias`` is per query row
  ``[B, seq_q, H, D]`` or per query block ``[B, H, Mq, D]``. This one form serves pooled rectification
  (R, c) and Re-ttention (rho, residual).

Batch and head dimensions of the CSR tables and of the epilogue may be 1 (broadcast), as in flex attention.

Malformed rows (hand-built plans; :meth:`SparsePlan.validate` and ``DIT_SPARSE_CHECKS=1`` reject them) are read
the same way by every backend, and never out of bounds: the count is clamped to ``[0, W]`` (``W`` the width of
``kv_indices``), and an entry is read only when it lies in ``[0, Mk)`` and is larger than every entry read
before it in its row. A duplicate is therefore read once, and an unsorted row reads its ascending run of
maxima. Well-formed rows (sorted, unique, in range) read exactly their listed entries.

Shapes: B batch, H heads, Mq = ceil(seq_q / block_q) query blocks, Mk = ceil(seq_k / block_k) key blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

__all__ = ["SparsePlan"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def read_entries(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Bool ``[B, H, Mq, W]``: which CSR entries a backend reads (the rule in the module docstring).

    Entry ``w`` of a row is read iff ``w < kv_num_blocks``, ``0 <= kv_indices[w] < num_k_blocks`` and
    ``kv_indices[w]`` exceeds every entry read before it. Element-wise and a ``cummax``: no device sync.
    """
    idx = kv_indices
    live = torch.arange(idx.shape[-1], device=idx.device) < kv_num_blocks.unsqueeze(-1)
    live = live & (idx >= 0) & (idx < num_k_blocks)
    running = torch.where(live, idx, torch.full_like(idx, -1)).cummax(-1).values
    before = torch.nn.functional.pad(running[..., :-1], (1, 0), value=-1)
    return live & (idx > before)


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """Block-sparse attention plan (CSR over key blocks, flex ``BlockMask`` field names, int32).

    Args:
        kv_num_blocks (`torch.Tensor`, int32 ``[B, H, Mq]``): key blocks read by each query block.
        kv_indices (`torch.Tensor`, int32 ``[B, H, Mq, W]``, ``1 <= W <= Mk``; ``W = Mk`` from :meth:`from_dense`):
            their indices, sorted ascending; entries past ``kv_num_blocks`` are ignored (malformed rows: see the
            module docstring).
        block_q (`int`), block_k (`int`): block sizes in tokens.
        seq_q (`int`), seq_k (`int`): true sequence lengths (the last block may be partial).
        kv_block_valid (`torch.Tensor`, int32 ``[Mk]``, *optional*): real tokens at the start of each key block;
            keys at offsets ``>= kv_block_valid[n]`` are masked. ``None`` means every key below ``seq_k`` is real.
        out_scale (`torch.Tensor`, float32 ``[B, H, seq_q]`` or ``[B, H, Mq]``, *optional*): epilogue row scale.
        out_bias (`torch.Tensor`, ``[B, seq_q, H, D]`` or ``[B, Mq, H, D]``, *optional*): epilogue additive term.
        known_dense (`bool`, defaults to False): a promise that every query block reads every key block (set by
            :meth:`dense`). Automatic dispatch sends such plans to dense kernels (SDPA) without reading the CSR
            tables, which would be a device sync; :meth:`validate` checks the promise. :attr:`is_dense` reads the
            tables (a sync) when the flag is not set.

    Every check in ``__post_init__`` reads only shapes, dtypes and devices (no device sync); value checks are in
    :meth:`validate` (``DIT_SPARSE_CHECKS=1`` runs it on every call).

    Build plans with :meth:`from_dense` or :meth:`dense` rather than by hand.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    kv_block_valid: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    known_dense: bool = False

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "seq_q", "seq_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SparsePlan.{name} must be a positive int, got {v!r}.")
        num, idx = self.kv_num_blocks, self.kv_indices
        if not (torch.is_tensor(num) and torch.is_tensor(idx)):
            raise ValueError("SparsePlan.kv_num_blocks and kv_indices must be tensors; build plans with "
                             "SparsePlan.from_dense(mask, block_q=..., block_k=...).")
        if num.dtype != torch.int32 or idx.dtype != torch.int32:
            raise ValueError(f"SparsePlan CSR tables must be int32, got kv_num_blocks.dtype={num.dtype}, "
                             f"kv_indices.dtype={idx.dtype}; convert with .to(torch.int32).")
        mq, mk = self.num_q_blocks, self.num_k_blocks
        if num.dim() != 3 or num.shape[-1] != mq:
            raise ValueError(f"kv_num_blocks must be [B, H, Mq={mq}] (seq_q={self.seq_q}, block_q={self.block_q}), "
                             f"got shape {tuple(num.shape)}.")
        if idx.dim() != 4 or idx.shape[:3] != num.shape or idx.shape[-1] > mk or idx.shape[-1] < 1:
            raise ValueError(f"kv_indices must be [B, H, Mq, W] with 1 <= W <= Mk={mk} (seq_k={self.seq_k}, "
                             f"block_k={self.block_k}) matching kv_num_blocks {tuple(num.shape)}, got "
                             f"{tuple(idx.shape)}; build plans with SparsePlan.from_dense (W = Mk).")
        if idx.device != num.device:
            raise ValueError(f"kv_num_blocks is on {num.device} but kv_indices on {idx.device}; move both with .to().")
        if self.kv_block_valid is not None:
            kbv = self.kv_block_valid
            if kbv.dtype != torch.int32 or kbv.shape != (mk,) or kbv.device != num.device:
                raise ValueError(f"kv_block_valid must be int32 [Mk={mk}] on {num.device}, got "
                                 f"{kbv.dtype} {tuple(kbv.shape)} on {kbv.device}.")
        if not isinstance(self.known_dense, bool):
            raise ValueError(f"SparsePlan.known_dense must be a bool, got {self.known_dense!r}.")
        for name in ("out_scale", "out_bias"):
            t = getattr(self, name)
            if t is not None and (not torch.is_tensor(t) or not t.is_floating_point()):
                got = t.dtype if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"SparsePlan.{name} must be a floating-point tensor, got {got}; convert with "
                                 f".float().")
        if self.out_scale is not None:
            s = self.out_scale
            if s.dim() != 3 or s.shape[-1] not in (self.seq_q, mq) or s.device != num.device:
                raise ValueError(f"out_scale must be [B, H, seq_q={self.seq_q}] (per row) or [B, H, Mq={mq}] "
                                 f"(per query block) on {num.device}, got {tuple(s.shape)} on {s.device}.")
        if self.out_bias is not None:
            b = self.out_bias
            ok = b.dim() == 4 and b.device == num.device and b.shape[1] in (self.seq_q, mq)
            if not ok:
                raise ValueError(f"out_bias must be [B, seq_q={self.seq_q}, H, D] (per row) or [B, Mq={mq}, H, D] "
                                 f"(per query block) on {num.device}, got {tuple(b.shape)} on {b.device}.")

    def validate(self) -> SparsePlan:
        """Content checks that read the tables (device syncs): counts in ``[0, W]``, listed indices in ``[0, Mk)``,
        rows strictly ascending (sorted, no duplicates), ``kv_block_valid`` in ``[0, block_k]``, ``known_dense``
        true. Returns ``self``. ``DIT_SPARSE_CHECKS=1`` runs it on every call of the op."""
        num, idx, mk = self.kv_num_blocks, self.kv_indices, self.num_k_blocks
        if bool((num < 0).any()) or bool((num > idx.shape[-1]).any()):
            raise ValueError(f"kv_num_blocks must lie in [0, {idx.shape[-1]}] (the width of kv_indices), got range "
                             f"[{int(num.min())}, {int(num.max())}]; build the plan with SparsePlan.from_dense.")
        live = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
        vals = idx[live]
        if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= mk):
            raise ValueError(f"kv_indices must lie in [0, Mk={mk}), got [{int(vals.min())}, {int(vals.max())}]; "
                             "build the plan with SparsePlan.from_dense.")
        if idx.shape[-1] > 1:
            both = live[..., 1:]
            if bool((idx[..., 1:] <= idx[..., :-1])[both].any()):
                raise ValueError("kv_indices rows must be strictly ascending (sorted, no duplicates); "
                                 "build the plan with SparsePlan.from_dense.")
        kbv = self.kv_block_valid
        if kbv is not None and (bool((kbv < 0).any()) or bool((kbv > self.block_k).any())):
            raise ValueError(f"kv_block_valid must lie in [0, block_k={self.block_k}], got range "
                             f"[{int(kbv.min())}, {int(kbv.max())}]; take it from TokenLayout.block_valid().")
        if self.known_dense and not bool(self.to_dense().all()):
            raise ValueError("SparsePlan(known_dense=True) promises that every query block reads all "
                             f"Mk={mk} key blocks, but some rows read fewer; drop known_dense.")
        return self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, mask: torch.Tensor, *, block_q: int, block_k: int, seq_q: int | None = None,
                   seq_k: int | None = None, kv_block_valid: torch.Tensor | None = None) -> SparsePlan:
        """Build a plan from a bool block mask ``[B, H, Mq, Mk]`` (True = read this key block).

        ``seq_q`` / ``seq_k`` default to ``Mq * block_q`` / ``Mk * block_k``.
        """
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"SparsePlan.from_dense expects a torch.bool block mask [B, H, Mq, Mk], got {got}; "
                             "convert with mask.bool() or (mask != 0).")
        if mask.dim() != 4:
            raise ValueError(f"SparsePlan.from_dense expects a 4-D block mask [B, H, Mq, Mk], got shape "
                             f"{tuple(mask.shape)}; add batch/head dims with mask[None, None].")
        mq, mk = mask.shape[-2:]
        seq_q = mq * block_q if seq_q is None else seq_q
        seq_k = mk * block_k if seq_k is None else seq_k
        if _cdiv(seq_q, block_q) != mq or _cdiv(seq_k, block_k) != mk:
            raise ValueError(f"Block mask {tuple(mask.shape)} does not fit seq_q={seq_q}, seq_k={seq_k} with "
                             f"block_q={block_q}, block_k={block_k}: expected Mq={_cdiv(seq_q, block_q)}, "
                             f"Mk={_cdiv(seq_k, block_k)}.")
        num = mask.sum(-1, dtype=torch.int32)
        # stable sort puts the True columns first, in ascending column order; the width stays Mk (fixed, like
        # flex's BlockMask): cutting it to the longest row would read that length back to the host (a sync)
        idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return cls(num, idx, block_q, block_k, seq_q, seq_k, kv_block_valid)

    @classmethod
    def dense(cls, *, seq_q: int, seq_k: int, block_q: int = 128, block_k: int = 128,
              device: torch.device | str = "cpu", kv_block_valid: torch.Tensor | None = None) -> SparsePlan:
        """The all-on plan (one batch/head entry, broadcast)."""
        mq, mk = _cdiv(seq_q, block_q), _cdiv(seq_k, block_k)
        num = torch.full((1, 1, mq), mk, dtype=torch.int32, device=device)
        idx = torch.arange(mk, dtype=torch.int32, device=device).expand(1, 1, mq, mk).contiguous()
        return cls(num, idx, block_q, block_k, seq_q, seq_k, kv_block_valid, known_dense=True)

    # ------------------------------------------------------------------ views
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.seq_q, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return _cdiv(self.seq_k, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Mq, Mk)`` of the block mask (B or H may be 1 = broadcast)."""
        b, h, mq = self.kv_num_blocks.shape
        return (b, h, mq, self.num_k_blocks)

    @property
    def scale_per_block(self) -> bool:
        """True when ``out_scale`` holds one value per query block (``[B, H, Mq]``)."""
        return self.out_scale is not None and self.out_scale.shape[-1] != self.seq_q

    @property
    def bias_per_block(self) -> bool:
        """True when ``out_bias`` holds one vector per query block (``[B, Mq, H, D]``)."""
        return self.out_bias is not None and self.out_bias.shape[1] != self.seq_q

    @property
    def has_epilogue(self) -> bool:
        return self.out_scale is not None or self.out_bias is not None

    def to_dense(self) -> torch.Tensor:
        """The bool block mask ``[B, H, Mq, Mk]`` (debugging and tests)."""
        b, h, mq, mk = self.shape
        idx = self.kv_indices
        read = read_entries(self.kv_num_blocks, idx, mk)
        out = torch.zeros(b, h, mq, mk + 1, dtype=torch.bool, device=idx.device)
        # entries not read are routed to the spare column mk, then dropped
        out.scatter_(-1, torch.where(read, idx, torch.full_like(idx, mk)).long(), True)
        return out[..., :mk]

    @functools.cached_property
    def density(self) -> float:
        """Fraction of (query, key) token pairs read, counting real tokens only.

        Keys: ``kv_block_valid`` and ``seq_k``. Queries: ``seq_q``, and for self-attention plans over a permuted
        layout (``seq_q == seq_k``, ``block_q == block_k``) the same ``kv_block_valid`` counts, so padding slots
        never change it.
        """
        mask = self.to_dense().float()
        qw = torch.full((self.num_q_blocks,), float(self.block_q), device=mask.device)
        qw[-1] = self.seq_q - (self.num_q_blocks - 1) * self.block_q
        kw = torch.full((self.num_k_blocks,), float(self.block_k), device=mask.device)
        kw[-1] = self.seq_k - (self.num_k_blocks - 1) * self.block_k
        if self.kv_block_valid is not None:
            kw = torch.minimum(kw, self.kv_block_valid.float())
            if self.seq_q == self.seq_k and self.block_q == self.block_k:
                qw = kw
        read = torch.einsum("bhmn,m,n->bh", mask, qw, kw)
        return float(read.mean() / (qw.sum() * kw.sum()))

    def sparsity(self) -> float:
        """``1 - density``: the fraction of the attention work skipped."""
        return 1.0 - self.density

    @functools.cached_property
    def is_dense(self) -> bool:
        """True when every query block reads every key block (reads the tables, a device sync, unless
        ``known_dense``)."""
        return self.known_dense or bool(self.to_dense().all())

    @functools.cached_property
    def keys_all_valid(self) -> bool:
        """True when no key block carries padding slots (only the ragged tail past ``seq_k``)."""
        if self.kv_block_valid is None:
            return True
        return bool((self.kv_block_valid >= self._keys_in_range()).all())

    def _keys_in_range(self) -> torch.Tensor:
        """Int32 ``[Mk]``: slots of each key block below ``seq_k`` (``block_k``, the ragged tail for the last)."""
        mk, bk = self.num_k_blocks, self.block_k
        real = torch.full((mk,), bk, dtype=torch.int32, device=self.device)
        real[-1] = self.seq_k - (mk - 1) * bk
        return real

    def key_slots_real(self) -> torch.Tensor:
        """Bool ``[Mk * block_k]``: which key slots hold a real key (below ``seq_k`` and, with ``kv_block_valid``,
        among the block's leading real tokens). Tensor ops only (no device sync)."""
        mk, bk = self.num_k_blocks, self.block_k
        slots = torch.arange(mk * bk, device=self.device)
        real = slots < self.seq_k
        if self.kv_block_valid is not None:
            real &= (slots % bk) < self.kv_block_valid.repeat_interleave(bk)
        return real

    def key_block_whole(self) -> torch.Tensor:
        """Bool ``[Mk]``: key blocks whose ``block_k`` slots are all real keys (no padding slot, not the ragged
        last block). Tensor ops only (no device sync)."""
        real = self._keys_in_range()
        if self.kv_block_valid is not None:
            real = torch.minimum(real, self.kv_block_valid)
        return real >= self.block_k

    def split_full(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan's read entries split into *full* key blocks (every slot a real key: read without a key mask)
        and *partial* ones (padding slots or the ragged tail: masked), as flex's ``BlockMask`` and
        FlashAttention-4 hold them.

        Returns ``(full_num, full_idx, partial_num, partial_idx)``: int32 ``[B, H, Mq]`` counts and
        ``[B, H, Mq, W]`` indices (``W`` the plan's width), each row sorted ascending, unique and in range: the
        entries :func:`read_entries` reads (malformed rows normalised by the one read rule), zero past the count.
        Tensor ops only (a stable sort per row): no device sync, widths independent of the data.
        """
        num, idx = self.kv_num_blocks, self.kv_indices
        mk = self.num_k_blocks
        read = read_entries(num, idx, mk)
        whole = self.key_block_whole()[idx.clamp(0, mk - 1).long()]
        pos = torch.arange(idx.shape[-1], device=idx.device, dtype=torch.int32)

        def compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # selected entries first, in their (ascending) row order; a stable sort on the 0/1 key keeps it
            order = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices
            count = sel.sum(-1, dtype=torch.int32)
            out = torch.where(pos < count.unsqueeze(-1), idx.gather(-1, order), torch.zeros_like(idx))
            return count, out

        full_num, full_idx = compact(read & whole)
        partial_num, partial_idx = compact(read & ~whole)
        return full_num, full_idx, partial_num, partial_idx

    @functools.cached_property
    def full_split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`split_full`, computed once per plan (its sort over ``[B, H, Mq, W]`` is paid once by a reused
        plan; :meth:`with_epilogue` and :meth:`without_epilogue` carry it over, as they keep the CSR tables).
        Sync-free like :meth:`split_full`. Treat the tensors as read-only."""
        return self.split_full()

    # ------------------------------------------------------------------ derivations
    def with_epilogue(self, out_scale: torch.Tensor | None = None,
                      out_bias: torch.Tensor | None = None) -> SparsePlan:
        """A copy of this plan with epilogue terms ``out = out_scale * attention + out_bias``."""
        return self._same_blocks(out_scale=out_scale, out_bias=out_bias)

    def without_epilogue(self) -> SparsePlan:
        return self._same_blocks(out_scale=None, out_bias=None)

    def _same_blocks(self, **changes) -> SparsePlan:
        """``dataclasses.replace`` for changes that keep the block structure: cached block views carry over."""
        new = dataclasses.replace(self, **changes)
        for name in ("full_split", "density", "keys_all_valid", "is_dense"):
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        return new

    def to(self, device: torch.device | str) -> SparsePlan:
        def mv(t):
            return None if t is None else t.to(device)
        return dataclasses.replace(self, kv_num_blocks=mv(self.kv_num_blocks), kv_indices=mv(self.kv_indices),
                                   kv_block_valid=mv(self.kv_block_valid), out_scale=mv(self.out_scale),
                                   out_bias=mv(self.out_bias))

    def expand(self, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR tables broadcast to ``[batch, heads, ...]`` (views, no copy)."""
        b, h = self.kv_num_blocks.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"Plan was built for batch={b}, heads={h}; it cannot serve batch={batch}, "
                             f"heads={heads}. Build the plan for these sizes (or with 1 to broadcast).")
        mq = self.kv_num_blocks.shape[-1]
        return (self.kv_num_blocks.expand(batch, heads, mq),
                self.kv_indices.expand(batch, heads, mq, self.kv_indices.shape[-1]))

    def __getitem__(self, item) -> SparsePlan:
        """Index the batch (and head) dims like flex's ``BlockMask``: ``plan[b]``, ``plan[b, h]``."""
        if not isinstance(item, tuple):
            item = (item,)
        if len(item) > 2:
            raise ValueError(f"SparsePlan indexes (batch, head) only, got {len(item)} indices.")
        norm = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in item)
        num, idx = self.kv_num_blocks[norm], self.kv_indices[norm]
        return dataclasses.replace(self, kv_num_blocks=num, kv_indices=idx, out_scale=None, out_bias=None)

    def to_flex(self, *, eager_safe: bool = True):
        """The equivalent ``torch.nn.attention.flex_attention.BlockMask``.

        ``eager_safe=True`` (default) puts the block structure into ``mask_mod`` as well, because uncompiled
        flex (CPU) evaluates only ``mask_mod``. ``eager_safe=False`` gives the fastest mask for compiled flex:
        blocks without padding are listed as *full* blocks (no ``mask_mod`` call) and only blocks with padding
        slots as partial blocks masked by key validity. Raises ``NotImplementedError`` without flex attention.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as e:  # pragma: no cover - torch < 2.5
            raise NotImplementedError("SparsePlan.to_flex needs torch >= 2.5 (flex_attention); "
                                      f"this torch is {torch.__version__}.") from e
        seq_k, bq, bk, mk = self.seq_k, self.block_q, self.block_k, self.num_k_blocks
        kmask = self.key_slots_real()
        if eager_safe:
            blocks = self.to_dense()
            bcast_b, bcast_h = blocks.shape[0] == 1, blocks.shape[1] == 1

            def mask_mod(b, h, q_idx, kv_idx):
                bi = b * 0 if bcast_b else b
                hi = h * 0 if bcast_h else h
                return blocks[bi, hi, q_idx // bq, kv_idx // bk] & kmask[kv_idx]

            # the CSR of the block mask actually read (well-formed, width Mk: flex reads Mk from the width)
            norm = SparsePlan.from_dense(blocks, block_q=bq, block_k=bk, seq_q=self.seq_q, seq_k=seq_k)
            return BlockMask.from_kv_blocks(norm.kv_num_blocks, norm.kv_indices, BLOCK_SIZE=(bq, bk),
                                            mask_mod=mask_mod, seq_lengths=(self.seq_q, seq_k))

        def mask_mod(b, h, q_idx, kv_idx):
            return kmask[kv_idx]

        full_num, full_idx, part_num, part_idx = self.full_split

        def pad(t):  # flex reads the number of key blocks from the width
            return torch.nn.functional.pad(t, (0, mk - t.shape[-1]))

        return BlockMask.from_kv_blocks(part_num, pad(part_idx), full_num, pad(full_idx),
                                        BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(self.seq_q, seq_k))

    def __repr__(self) -> str:
        b, h, mq, mk = self.shape
        epi = []
        if self.out_scale is not None:
            epi.append(f"out_scale{tuple(self.out_scale.shape)}")
        if self.out_bias is not None:
            epi.append(f"out_bias{tuple(self.out_bias.shape)}")
        pad = "" if self.kv_block_valid is None else ", padded key blocks"
        return (f"SparsePlan(shape=(B={b}, H={h}, Mq={mq}, Mk={mk}), blocks=({self.block_q}, {self.block_k}), "
                f"seq=({self.seq_q}, {self.seq_k}), density={self.density:.2%}{pad}"
                f"{', epilogue=' + '+'.join(epi) if epi else ''}, device={self.device})")
