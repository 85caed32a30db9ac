"""Block-sparse attention op benchmark at real model shapes (docs/models.md#grids).

For Wan2.1 480p / 720p and HunyuanVideo 720p (head_dim 128, bf16) and densities 1.0 / 0.5 / 0.25 / 0.1 / 0.05,
times (median ms) with the same shapes and, for the sparse peers, the same block mask:

* dense peers: SDPA per backend (cuDNN, flash, efficient), xformers, flash-attn-4 (``flash_attn.cute``) dense;
* sparse peers: flex_attention (compiled) on the same plan, flash-attn-4 block-sparse on the same plan (the ``fa4``
  backend: its ``block_sparse_tensors`` input in flex's BlockMask layout, padding slots masked), and the Sol-Attn
  kernel of comfy-kitchen (its own block selection, asked for the same density);
* ours: every backend registered in ``dit_sparse.backends.BACKENDS`` but ``torch`` (``ours_<name>_ms``; a backend
  added later appears with no change here) on the permuted sequence (the padding slots count in its time). Each
  is first checked against the fp32 torch reference on the rows of a few query blocks (first, middle, last video,
  last; real tokens only) and timed only within ``2e-2`` relative error (bf16; a larger error is a ``WRONG`` row
  status and a non-zero exit); one that cannot run the call records its own reasons (``not_supported_reasons`` +
  ``segment_reasons``) as its status. Then ``auto``: the backend ``choose_backend`` picks, timed through the
  public call (``ours_ms``, ``ours_backend``), the fastest backend, and whether automatic dispatch took it
  (within 3%: ``auto_is_fastest``);
* the same for the row mode's pooled key segment (``pooled_<name>_ms``, ``pooled_ms``; sparse densities only):
  the plan's call with the ``PooledSegment`` of ``combine="row"`` (outlier keys) read in the same softmax, on
  every backend that reads it;
* permute + unpermute timed apart.

Every peer is optional: one that is not installed, or whose API does not take the call, gives a row with the
reason (``peers`` in the JSON), never a crash. Each row carries the real and the padded token counts
(``tokens``, ``padded_tokens``, ``padding``) of the layout (``--packing packed|tiled``). Prints a table and writes
JSON to benchmarks/results/attention-<gpu>.json (or ``--out DIR``) after every row, and once inside a row when ours
and the flex peer are measured (``"partial": true``); ``--budget S`` starts no row after S seconds.

    python benchmarks/attention.py                     # needs a CUDA GPU
    python benchmarks/attention.py --out results_dir   # JSON into that folder
    python benchmarks/attention.py --smoke             # CPU dry run on tiny shapes (checks the script only)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import SHAPES, Shape, bench, environment, print_table, write_json  # noqa: E402
from dit_sparse import SparsePlan, TokenLayout, block_sparse_attention  # noqa: E402
from dit_sparse.backends import BACKENDS, AttentionInputs, choose_backend  # noqa: E402
from dit_sparse.segment import PooledSegment  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


def random_plan(layout: TokenLayout, heads: int, density: float, device, seed: int = 0) -> SparsePlan:
    """Every video query block reads round(density * Nv) video blocks (its own included) plus all text blocks;
    text query blocks are dense. Per-head random selection (a realistic, uniform per-row workload)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, nv = layout.num_blocks, layout.num_video_blocks
    keep = max(1, round(density * nv))
    score = torch.rand(1, heads, nv, nv, generator=g)
    score[..., torch.arange(nv), torch.arange(nv)] = 2.0  # diagonal always in
    top = score.topk(keep, dim=-1).indices
    mask = torch.zeros(1, heads, n, n, dtype=torch.bool)
    mask[..., :nv, :nv].scatter_(-1, top, True)
    mask[..., nv:] = True
    mask[..., nv:, :] = True
    mask = mask.to(device)
    return SparsePlan.from_dense(mask, block_q=layout.block_size, block_k=layout.block_size,
                                 seq_q=layout.padded_len, seq_k=layout.padded_len,
                                 kv_block_valid=layout.block_valid(device))


def sdpa_times(q, k, v) -> dict[str, float | None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = {}
    for name, kind in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                       ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([kind]):
                F.scaled_dot_product_attention(qt, kt, vt)
                out[name] = _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        except RuntimeError as e:
            print(f"  sdpa {name}: unavailable ({str(e).splitlines()[0][:80]})")
            out[name] = None
    return out


def xformers_time(q, k, v) -> float | None:
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return _bench(lambda: xops.memory_efficient_attention(q, k, v))


def _peer_status(module: str) -> str | None:
    """None when ``module`` can be imported, else the row text ``"not installed (module)"``."""
    try:
        return None if importlib.util.find_spec(module) is not None else f"not installed ({module})"
    except (ImportError, ValueError):
        return f"not installed ({module})"


def fa4_dense_time(q, k, v) -> tuple[float | None, str]:
    """flash-attn-4 dense forward (``flash_attn.cute.flash_attn_func``, [B, S, H, D])."""
    missing = _peer_status("flash_attn.cute")
    if missing:
        return None, missing
    try:
        from flash_attn.cute import flash_attn_func

        flash_attn_func(q, k, v)
        return _bench(lambda: flash_attn_func(q, k, v)), "ok"
    except Exception as e:  # a peer that cannot run is a data point
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def sol_attn_fn():
    """comfy-kitchen's Sol-Attn kernel (``comfy_kitchen.sol_attn``, ``[B, T, H, 128]`` bf16/fp16, 64-token blocks in
    sequence order) with its own top-k block selection at a requested density (``topk_ratio``, ``tail=False``:
    softmax over the routed blocks only, like a plain block-sparse call), or the reason it cannot run."""
    missing = _peer_status("comfy_kitchen")
    if missing:
        return None, missing
    try:
        import comfy_kitchen
    except Exception as e:
        return None, f"import failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    fn = getattr(comfy_kitchen, "sol_attn", None)
    if fn is None:
        return None, f"installed ({getattr(comfy_kitchen, '__version__', '?')}) without sol_attn"
    available = getattr(comfy_kitchen, "sol_attn_is_available", None)
    if available is not None and not available(torch.device("cuda")):
        return None, "sol_attn_is_available() is False on this GPU"

    def call(q, k, v, density):
        return fn(q, k, v, topk_ratio=float(density), tail=False)

    return call, "ok"


def flex_fn():
    """Compiled flex_attention (CUDA; the same guarded compiled call as the ``flex`` backend), eager on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        from dit_sparse.backends.flex import compiled_flex_attention

        return compiled_flex_attention
    return flex_attention


#: set by --smoke: one timed call, no warm-up (the CPU dry run checks the script, not the numbers)
_SMOKE = False


def _bench(fn, rep: int = 10) -> float:
    return bench(fn, warmup=0, rep=1) if _SMOKE else bench(fn, rep=rep)


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"failed: {type(e).__name__}: {text}"


def check_blocks(layout: TokenLayout) -> list[int]:
    """Query blocks checked against the fp32 reference: the first, a middle one, the last video block (the packed
    partial one) and the last block (text)."""
    n, nv = layout.num_blocks, layout.num_video_blocks
    return sorted({0, nv // 2, max(nv - 1, 0), n - 1})


class RowReference:
    """The fp32 torch reference on the rows of a few query blocks (a full reference at 119k tokens would cost
    seconds per call), and the relative error of a backend's output on those rows (real tokens only)."""

    def __init__(self, q, k, v, layout: TokenLayout, plan: SparsePlan, pooled: PooledSegment | None = None):
        from dit_sparse.reference.attention import block_sparse_attention_reference

        blocks = check_blocks(layout)
        bq = plan.block_q
        rows = torch.cat([torch.arange(b * bq, min((b + 1) * bq, plan.seq_q)) for b in blocks]).to(q.device)
        mask = plan.to_dense()[:, :, blocks]
        sub = SparsePlan.from_dense(mask, block_q=bq, block_k=plan.block_k, seq_q=rows.numel(), seq_k=plan.seq_k,
                                    kv_block_valid=plan.kv_block_valid)
        seg = None
        if pooled is not None:
            seg = PooledSegment(keys=pooled.keys, values=pooled.values, log_count=pooled.log_count,
                                read=pooled.read[:, :, blocks], gate=pooled.gate)
        self.ref = block_sparse_attention_reference(q[:, rows].float(), k.float(), v.float(), sub,
                                                    scale=1.0 / math.sqrt(q.shape[-1]), pooled=seg)
        real = layout.indices(q.device).perm[rows] >= 0
        self.rows, self.ref = rows[real], self.ref[:, real]

    def rel_err(self, out: torch.Tensor) -> float:
        got = out[:, self.rows].float()
        return float((got - self.ref).norm() / self.ref.norm().clamp_min(1e-30))


class CudaBroken(RuntimeError):
    """A backend left the CUDA context unusable (an illegal address, say): every later call would fail too."""


def _cuda_broken() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def backend_order() -> tuple[list[str], list[str]]:
    """Registered backends but ``torch``: those automatic dispatch may pick first, then the named-only ones (not yet
    run on a GPU, so that one that breaks the CUDA context comes after the rest of the row is measured)."""
    names = [n for n in BACKENDS if n != "torch"]
    return [n for n in names if BACKENDS[n].auto], [n for n in names if not BACKENDS[n].auto]


def our_backends(qp, kp, vp, plan: SparsePlan, ref: RowReference, tol: float, rep: int,
                 pooled: PooledSegment | None = None, names: list[str] | None = None, auto: bool = True,
                 res: dict | None = None) -> dict:
    """The backends ``names`` (default: every registered one but ``torch``) on this call: each one's reasons when it
    cannot run, else its error on the reference rows and (when within ``tol``) its time; with ``auto``, then what
    ``choose_backend`` picks, timed through the public call. Adds to ``res`` and returns it; ``rank`` fills in
    the fastest. Raises ``CudaBroken`` when a backend leaves the CUDA context unusable."""
    scale = 1.0 / math.sqrt(qp.shape[-1])
    inputs = AttentionInputs(qp, kp, vp, plan, scale, False, pooled)
    res = {} if res is None else res
    for name in (sum(backend_order(), []) if names is None else names):
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(inputs) + backend.segment_reasons(inputs)
        if reasons:
            res[name] = {"status": "cannot run: " + "; ".join(reasons), "ms": None, "rel_err": None}
            continue
        try:
            err = ref.rel_err(block_sparse_attention(qp, kp, vp, plan, backend=name, pooled=pooled))
            if not err <= tol:  # NaN fails too
                res[name] = {"status": f"WRONG: rel err {err:.3g} > {tol:g} vs the fp32 reference", "ms": None,
                             "rel_err": err}
                continue
            ms = _bench(lambda n=name: block_sparse_attention(qp, kp, vp, plan, backend=n, pooled=pooled), rep=rep)
            res[name] = {"status": "ok", "ms": ms, "rel_err": err}
        except Exception as e:  # a backend that breaks is a data point; the table says how
            res[name] = {"status": _why(e), "ms": None, "rel_err": None}
            if _cuda_broken():
                raise CudaBroken(f"backend {name!r} left the CUDA context unusable: {_why(e)}") from e
    if auto:
        try:
            picked = choose_backend(inputs).name
            auto_err = ref.rel_err(block_sparse_attention(qp, kp, vp, plan, pooled=pooled))
            auto_ms = _bench(lambda: block_sparse_attention(qp, kp, vp, plan, pooled=pooled), rep=rep) \
                if auto_err <= tol else None
            status = "ok" if auto_ms is not None else f"WRONG: rel err {auto_err:.3g} > {tol:g}"
        except Exception as e:
            picked, auto_err, auto_ms, status = None, None, None, _why(e)
            if _cuda_broken():
                raise CudaBroken(f"automatic dispatch left the CUDA context unusable: {_why(e)}") from e
        res["auto"] = {"status": status, "ms": auto_ms, "rel_err": auto_err, "backend": picked}
    return rank(res)


def rank(res: dict) -> dict:
    """``res["auto"]``'s ``fastest`` (over every timed backend) and ``is_fastest`` (within 3%: timing noise)."""
    auto = res.get("auto")
    if auto is None:
        return res
    timed = {n: r["ms"] for n, r in res.items() if n != "auto" and r["ms"] is not None}
    if auto["backend"] not in timed and auto["ms"] is not None:  # auto took a backend not timed (torch on CPU)
        timed[auto["backend"]] = auto["ms"]
    fastest = min(timed, key=timed.get) if timed else None
    auto["fastest"] = fastest
    auto["is_fastest"] = None if fastest is None or auto["ms"] is None else \
        bool(auto["backend"] == fastest or auto["ms"] <= 1.03 * timed[fastest])
    return res


def row_segment(qp, kp, vp, layout: TokenLayout, plan: SparsePlan) -> PooledSegment:
    """The pooled key segment of the shipped row mode (``combine="row"``, outlier keys) for this plan's mask."""
    from dit_sparse.methods.pooled_rectification import (
        PooledRectificationConfig,
        block_statistics,
        pooled_segment,
        row_outlier_count,
    )

    cfg = PooledRectificationConfig(combine="row")
    stats = block_statistics(qp, kp, vp, layout, outliers=row_outlier_count(cfg))
    return pooled_segment(layout, plan.to_dense(), cfg, stats=stats, device=qp.device)


def dense_peers(q, k, v, device) -> dict:
    """Dense peers on the model-order tensors (independent of the packing: measured once per shape)."""
    dense = sdpa_times(q, k, v) if device.type == "cuda" else {"math": _bench(
        lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))), rep=3)}
    xf = xformers_time(q, k, v) if device.type == "cuda" else None
    peers = {"xformers": "ok" if xf is not None else (_peer_status("xformers") or "cuda only")}
    fa4_ms, peers["fa4_dense"] = fa4_dense_time(q, k, v) if device.type == "cuda" else (None, "cuda only")
    sol, peers["sol_attn"] = sol_attn_fn() if device.type == "cuda" else (None, "cuda only")
    return {"dense": dense, "xformers": xf, "fa4_dense": fa4_ms, "peers": peers, "sol": sol}


def build_row(shape: Shape, layout: TokenLayout, q, plan: SparsePlan, density: float, peers: dict, ours: dict,
              pooled: dict, m: dict) -> dict:
    """The JSON row from what has been measured so far (``m``: the peers' times, statuses and errors)."""
    dense = peers["dense"]
    best_dense = min((t for t in dense.values() if t is not None), default=None)
    auto = ours["auto"]
    ours_ms = auto["ms"]
    row = {"shape": shape.name, "packing": layout.packing, "tile": layout.tile, "tokens": layout.seq_len,
           "padded_tokens": layout.padded_len, "padding": round(layout.padding_fraction, 5),
           "heads": shape.heads, "head_dim": shape.head_dim, "dtype": str(q.dtype).replace("torch.", ""),
           "density_requested": density, "density": round(plan.density, 4),
           **{f"sdpa_{n}_ms": t for n, t in dense.items()},
           "xformers_ms": peers["xformers"], "fa4_dense_ms": peers["fa4_dense"], "flex_ms": m["flex_ms"],
           "fa4_sparse_ms": m["fa4_sparse_ms"], "sol_attn_ms": m["sol_ms"],
           # ours = what a user gets: the backend automatic dispatch picks, timed through the public call
           "ours_ms": ours_ms, "ours_backend": auto["backend"], "fastest_backend": auto["fastest"],
           "auto_is_fastest": auto["is_fastest"],
           **{f"ours_{n}_ms": r["ms"] for n, r in ours.items() if n != "auto"},
           "pooled_ms": pooled.get("auto", {}).get("ms"), "pooled_backend": pooled.get("auto", {}).get("backend"),
           **{f"pooled_{n}_ms": r["ms"] for n, r in pooled.items() if n != "auto"},
           "permute_ms": m["permute_ms"], "backends": ours, "pooled_backends": pooled,
           "peers": {**peers["peers"], "fa4_sparse": m["fa4_status"], "sol_attn": m["sol_status"]},
           "rel_err_fa4_vs_ref": m["fa4_err"], "rel_err_flex_vs_ref": m["flex_err"],
           "rel_err_ours": auto["rel_err"],
           "speedup_vs_dense": None if best_dense is None or not ours_ms else best_dense / ours_ms,
           "speedup_vs_flex": None if m["flex_ms"] is None or not ours_ms else m["flex_ms"] / ours_ms}
    return row


def run_row(shape: Shape, layout: TokenLayout, q, k, v, peers: dict, density: float, device, smoke: bool,
            tol: float, save=None) -> dict:
    """One (shape, packing, density) row: every backend of ours, the peers, then the pooled segment.

    ``save(partial_row)`` is called once ours and the flex peer are measured (the issue's targets need only
    those), so that a stage killed at its time limit in a long row still keeps them."""
    rep = 2 if smoke else 10
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    permute_ms = _bench(lambda: [layout.permute(t) for t in (q, k, v)] + [layout.unpermute(qp)], rep=3)
    plan = random_plan(layout, shape.heads, density, device)
    ref = RowReference(qp, kp, vp, layout, plan)
    first, named_only = backend_order()
    ours = our_backends(qp, kp, vp, plan, ref, tol, rep, names=first)
    flex_ms = err = None
    try:
        flex = flex_fn()
        bm = plan.to_flex(eager_safe=device.type != "cuda")
        qt, kt, vt = (t.transpose(1, 2) for t in (qp, kp, vp))
        flex_out = flex(qt, kt, vt, block_mask=bm).transpose(1, 2)
        flex_ms = _bench(lambda: flex(qt, kt, vt, block_mask=bm), rep=rep)
        err = ref.rel_err(flex_out)
    except Exception as e:  # flex failing is a data point, not a crash
        print(f"  flex at density {density}: {_why(e)}")
    if save is not None:
        save({**build_row(shape, layout, q, plan, density, peers, ours, {}, dict(
            flex_ms=flex_ms, flex_err=err, fa4_sparse_ms=None, fa4_status="not reached", fa4_err=None,
            sol_ms=None, sol_status="not reached", permute_ms=permute_ms)), "partial": True})
    ours = our_backends(qp, kp, vp, plan, ref, tol, rep, names=named_only, auto=False, res=ours)
    # flash-attn-4 block-sparse on the same plan is the ``fa4`` backend (timed above with ours, its plan
    # conversion included, as a sparse call pays it): its columns repeat that entry
    fa4 = ours.get("fa4", {"status": "no fa4 backend registered", "ms": None, "rel_err": None})
    fa4_sparse_ms, fa4_err = fa4["ms"], fa4["rel_err"]
    fa4_status = "ok" if fa4["status"] == "ok" else (_peer_status("flash_attn.cute") or fa4["status"])
    sol_ms, sol_status = None, peers["peers"]["sol_attn"]
    if peers["sol"] is not None:
        try:  # its own selection, asked for our density (model order: it does its own layout)
            peers["sol"](q, k, v, density=density)
            sol_ms = _bench(lambda d=density: peers["sol"](q, k, v, density=d), rep=10)
        except Exception as e:
            sol_status = _why(e)
    pooled = {}
    if density < 1.0:  # the row mode's pooled segment reads the skipped blocks (none on an all-dense plan)
        try:
            seg = row_segment(qp, kp, vp, layout, plan)
            ref_seg = RowReference(qp, kp, vp, layout, plan, seg)
            pooled = our_backends(qp, kp, vp, plan, ref_seg, tol, rep, seg, names=first)
            pooled = our_backends(qp, kp, vp, plan, ref_seg, tol, rep, seg, names=named_only, auto=False,
                                  res=pooled)
        except CudaBroken:
            raise
        except Exception as e:
            pooled = {"auto": {"status": _why(e), "ms": None, "rel_err": None, "backend": None, "fastest": None,
                               "is_fastest": None}}
    row = build_row(shape, layout, q, plan, density, peers, ours, pooled, dict(
        flex_ms=flex_ms, flex_err=err, fa4_sparse_ms=fa4_sparse_ms, fa4_status=fa4_status, fa4_err=fa4_err,
        sol_ms=sol_ms, sol_status=sol_status, permute_ms=permute_ms))
    best_dense = min((t for t in peers["dense"].values() if t is not None), default=None)
    states = ", ".join(f"{n} {_fmt_ms(r)}" for n, r in ours.items())
    print(f"  density {density:<5} {states}; flex peer {_fmt_ms({'ms': flex_ms})}; best dense "
          f"{_fmt_ms({'ms': best_dense})}" + (f"; pooled: {', '.join(f'{n} {_fmt_ms(r)}' for n, r in pooled.items())}"
                                              if pooled else ""))
    return row


def _fmt_ms(r: dict) -> str:
    if r.get("ms") is not None:
        return f"{r['ms']:.3f} ms" + (f" ({r['backend']})" if r.get("backend") else "")
    return f"- ({r['status']})" if r.get("status") else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--packing", default="packed", choices=["packed", "tiled", "both"],
                    help="TokenLayout packing of ours (both: every packed row first, then the tiled ones)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no new row after this (the rows left are listed under 'skipped')")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny shapes (no numbers worth reporting)")
    args = ap.parse_args(argv)
    densities = [float(d) for d in args.densities.split(",")]
    global _SMOKE
    _SMOKE = args.smoke
    if args.smoke:
        shapes = [Shape("smoke", 2, 8, 16, 2, text=20, head_dim=32)]
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("benchmarks/attention.py needs a CUDA GPU (times on CPU say nothing about the kernel). "
                  "Run it on a GPU machine, or pass --smoke for a CPU dry run of the script.", file=sys.stderr)
            return 2
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
        shapes = [SHAPES[s] for s in args.shapes.split(",")]
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    write = not args.smoke or args.out is not None  # smoke runs write only where asked (the suite's dry run)
    started = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    cache: dict[str, tuple] = {}  # shape -> (q, k, v, dense peers): model order, the same for every packing
    packings = ["packed", "tiled"] if args.packing == "both" else [args.packing]
    path = None
    broken = None  # set when a backend left the CUDA context unusable
    pending: list[dict] = []  # the current row's partial save

    def save(done: list[dict]) -> None:
        """JSON after every row and inside a row: a stage killed at its time limit keeps what it measured."""
        nonlocal path
        if write:
            path = write_json("attention", {"environment": environment(), "rows": done, "skipped": skipped,
                                        "stopped": broken}, folder=args.out)

    with torch.no_grad():
        for packing in packings:
            for shape in shapes:
                layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width,
                                     text_tokens=shape.text, packing=packing)
                for density in densities:
                    label = f"{shape.name} {packing} density {density}"
                    if broken or (args.budget is not None and time.perf_counter() - started > args.budget):
                        skipped.append(label)
                        continue
                    if shape.name not in cache:
                        g = torch.Generator(device=device).manual_seed(0)
                        q, k, v = (torch.randn(1, shape.tokens, shape.heads, shape.head_dim, generator=g,
                                               device=device, dtype=dtype) for _ in range(3))
                        print(f"\n{shape.name}: {shape.tokens} tokens, heads={shape.heads}, D={shape.head_dim}, "
                              f"{dtype}; dense peers")
                        cache.clear()  # one shape's tensors at a time
                        cache[shape.name] = (q, k, v, dense_peers(q, k, v, device))
                    q, k, v, peers = cache[shape.name]
                    if density == densities[0]:
                        print(f"{shape.name}: {layout!r}")
                    pending.clear()
                    try:
                        rows.append(run_row(shape, layout, q, k, v, peers, density, device, args.smoke, tol,
                                            save=lambda partial: (pending.append(partial), save(rows + [partial]))))
                    except CudaBroken as e:  # every later call would fail: keep what is measured, stop
                        broken = f"{label}: {e}"
                        print(f"STOPPED: {broken}", file=sys.stderr)
                        rows.extend(pending[-1:])  # the row's partial save (ours and the flex peer), if reached
                    save(rows)
    save(rows)  # with the rows skipped at the end
    if not rows:
        print(f"no row measured within --budget {args.budget} s" if not broken else f"stopped early: {broken}",
              file=sys.stderr)
        return 1
    names = [n for n in BACKENDS if n != "torch"]
    cols = ["shape", "packing", "padded_tokens", "density", *[c for c in rows[0] if c.startswith("sdpa_")],
            "xformers_ms", "fa4_dense_ms", "flex_ms", "fa4_sparse_ms", "sol_attn_ms",
            *[f"ours_{n}_ms" for n in names], "ours_backend", "ours_ms", "auto_is_fastest", "pooled_backend",
            "pooled_ms", "speedup_vs_dense", "speedup_vs_flex", "rel_err_ours"]
    print()
    print_table(rows, cols)
    print("\npeers:", dict(rows[0]["peers"]))
    print("backends that did not run:", {n: r["status"] for n, r in rows[0]["backends"].items() if r["ms"] is None})
    if skipped:
        print(f"skipped (time budget {args.budget} s): {skipped}")
    if write:
        print(f"\nwrote {path}")
    wrong = [(r["shape"], r["packing"], r["density_requested"], n) for r in rows
             for n, b in {**r["backends"], **{f"pooled:{k}": v for k, v in r["pooled_backends"].items()}}.items()
             if b["status"].startswith("WRONG")]
    if wrong:
        print(f"WRONG results (rel err above {tol:g} vs the fp32 reference): {wrong}", file=sys.stderr)
    if broken:
        print(f"stopped early: {broken}", file=sys.stderr)
    return 1 if wrong or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
