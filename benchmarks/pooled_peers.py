"""Exact-plus-pooled attention against its peer, Sol-Attn, on the same inputs.

Relative L2 error of the attention output against dense attention, at matched block density, on

* the three structured input families of ``tests/utils.py`` (``diffuse``, ``local``, ``sharp_sparse``; 4 x 32 x 32
  latent grid, 64-token tiles, 64 blocks, 2 heads of dim 32, two seeds each), and
* attention captured from the embedded trained tiny model (every self-attention layer at three denoising steps of
  one prompt; 5 x 8 x 8 grid, 16-token tiles, 20 blocks).

Methods, all on the same key-block selection except Sol-Attn, which routes its own:

  draft               DraftAttention row_topk alone (no compensation)
  draft+rect (block)  + the reference per-query-block rectification (IPAR + GAPR epilogue)
  draft+row (mean)    + the per-row remainder, one mean key per skipped block, GAPR per row (row_keys="mean")
  draft+row           + the per-row remainder, each skipped block's ``row_outliers`` (default 2) most deviating
                      keys exactly plus the mean of the rest (row_keys="outlier", the default of combine="row"):
                      the sharp-attention safeguard
  sol-attn            comfy-kitchen's eager ``sol_attn`` reference (CPU), ``topk_ratio`` routing, pooled tail

Sol-Attn takes ``(B, T, H, 128)`` tensors in 64-token blocks. Each of our tiles becomes one of its blocks (the tile's
tokens at the front of a 64-token block, ``block_len`` = the tile's real tokens; its dead rows are never keys), the
head dim is zero-padded to 128 (``q . k`` unchanged) and ``scale`` is passed explicitly. Its exact-block density is
measured by a probe (one-hot block values with ``tail=False``) and our draft keeps the most whole blocks per row
that stay at or below it (``floor(density * Nv)``): the "density" columns give both. It forces the blocks at +-1 in its
block order (our tile raster order) and scores the pooled tail with the query block's centroid, shared by its rows.

``--presets`` (the real-model presets' combine): every real-model preset with pooled rectification,
grouped by its selection and rectification settings (the dense policy aside), on its own selection at block 128
and head dim 128 on the three structured families (5 x 30 x 52 grid: Wan 480p rows and columns, 5 latent frames,
7,800 tokens, 61 blocks; 2 heads, seed 0), and at the embedded model's own 16-token blocks on its captured
attention: relative error of the selection alone, of block rectification and of row rectification (the shipped
``row_keys="outlier"``, default ``row_outliers``) on the same mask. Writes
benchmarks/results/pooled-presets-cpu.json and pooled-presets.md.

Needs ``pip install comfy-kitchen`` (not a dependency of dit_sparse); without it the Sol-Attn column is skipped.
The CUDA Sol-Attn kernel is not timed here: :func:`sol_attn_cuda_hook` is the entry for the GPU suite.

    python benchmarks/pooled_peers.py                      # about 4 minutes on 2 CPU cores
    python benchmarks/pooled_peers.py --no-embedded --seeds 1 --ratios 0.1
    python benchmarks/pooled_peers.py --presets            # about 6 minutes on 2 CPU cores

Writes benchmarks/results/pooled-peers-cpu.json and pooled-peers.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, environment, print_table, write_json  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods.base import plan_from_mask  # noqa: E402
from dit_sparse.methods.draft_attention import DraftAttentionConfig, draft_mask  # noqa: E402
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig, rectified_attention  # noqa: E402
from dit_sparse.ops import block_sparse_attention  # noqa: E402

METHODS = ("draft", "draft+rect (block)", "draft+row (mean)", "draft+row", "sol-attn")
SOL_BLOCK, SOL_DIM = 64, 128
FAMILY_LAYOUT = TokenLayout(frames=4, height=32, width=32, tile=(1, 8, 8))
#: the real-model presets' comparison: block 128 (tile picked as for a model), Wan 480p rows and columns
PRESET_LAYOUT = TokenLayout(frames=5, height=30, width=52)
PRESET_VARIANTS = ("selection", "block", "row")


def has_comfy_kitchen() -> bool:
    try:
        import comfy_kitchen  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- Sol-Attn
def _to_sol(x_perm: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Permuted ``[B, N*bs, H, D]`` -> ``[B, N*64, H, 128]``: tile j at the front of Sol block j, zero padding."""
    b, _, h, d = x_perm.shape
    n, bs = layout.num_blocks, layout.block_size
    out = x_perm.new_zeros(b, n, SOL_BLOCK, h, SOL_DIM)
    out[:, :, :bs, :, :d] = x_perm.reshape(b, n, bs, h, d)
    return out.reshape(b, n * SOL_BLOCK, h, SOL_DIM)


def sol_attention(q_perm, k_perm, v_perm, layout: TokenLayout, *, scale: float, topk_ratio: float,
                  tail: bool = True, tau: float = 1.0) -> torch.Tensor:
    """comfy-kitchen's ``sol_attn`` on our tiles; returns the permuted ``[B, P, H, D]`` output (float32).
    ``topk_ratio`` > 0 routes by top-k (``tau`` ignored), 0 by its ``tau`` threshold."""
    import comfy_kitchen

    if layout.block_size > SOL_BLOCK or layout.text_tokens:
        raise ValueError("sol_attention maps one tile to one 64-token Sol block: tiles of <= 64 tokens, no text.")
    b, _, h, d = q_perm.shape
    n, bs = layout.num_blocks, layout.block_size
    block_len = layout.block_valid().clamp(min=1).to(torch.int32)
    out = comfy_kitchen.sol_attn(*(_to_sol(t.float(), layout) for t in (q_perm, k_perm, v_perm)), scale=scale,
                                 topk_ratio=topk_ratio, tail=tail, block_len=block_len, tau=tau)
    return out.reshape(b, n, SOL_BLOCK, h, SOL_DIM)[:, :, :bs, :, :d].reshape(b, n * bs, h, d)


def sol_density(q_perm, k_perm, layout: TokenLayout, *, scale: float, topk_ratio: float, tau: float = 1.0) -> float:
    """Fraction of (query block, key block) pairs Sol-Attn attends exactly, by a probe: every token of Sol block
    ``j`` carries the value ``e_j`` and ``tail=False``, so each output row is that row's attention mass per key
    block (nonzero = routed exactly)."""
    import comfy_kitchen

    n = layout.num_blocks
    if n > SOL_DIM:
        raise ValueError(f"the density probe needs <= {SOL_DIM} blocks, got {n}.")
    b, _, h, _ = q_perm.shape
    probe = torch.zeros(b, n, SOL_BLOCK, h, SOL_DIM)
    probe[:, torch.arange(n), :, :, torch.arange(n)] = 1.0
    out = comfy_kitchen.sol_attn(_to_sol(q_perm.float(), layout), _to_sol(k_perm.float(), layout),
                                 probe.reshape(b, n * SOL_BLOCK, h, SOL_DIM), scale=scale, topk_ratio=topk_ratio,
                                 tau=tau, tail=False, block_len=layout.block_valid().clamp(min=1).to(torch.int32))
    first = out.reshape(b, n, SOL_BLOCK, h, SOL_DIM)[:, :, 0, :, :n]  # row 0 of every block is a real token
    return float((first > 0).float().mean())


def sol_attn_cuda_hook(q, k, v, *, scale: float, topk_ratio: float, block_len=None):
    """Entry for the GPU suite (benchmarks/gpu_suite): the CUDA Sol-Attn kernel on ``(B, T, H, 128)`` bf16 tensors
    laid out by :func:`_to_sol`. comfy-kitchen dispatches to its fused kernel when CUDA is present. Not timed here
    (no GPU on this machine)."""
    import comfy_kitchen

    if not comfy_kitchen.sol_attn_is_available(q.device):
        raise NotImplementedError(f"comfy-kitchen has no fused Sol-Attn kernel for {q.device}.")
    return comfy_kitchen.sol_attn(q, k, v, scale=scale, topk_ratio=topk_ratio, block_len=block_len)
# ---------------------------------------------------------------------------------------------------- ours
def _dense(q, k, v, scale):
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


def _err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def evaluate(q, k, v, layout: TokenLayout, *, scale: float, topk_ratio: float, with_sol: bool) -> dict:
    """Errors of every method on one input (model order ``[B, S, H, D]``, no text) at Sol's density."""
    qp, kp, vp = (layout.permute(t.float()) for t in (q, k, v))
    dense = _dense(q, k, v, scale)
    row = {}
    if with_sol:
        density = sol_density(qp, kp, layout, scale=scale, topk_ratio=topk_ratio)
        row["sol-attn"] = _err(layout.unpermute(sol_attention(qp, kp, vp, layout, scale=scale,
                                                              topk_ratio=topk_ratio)), dense)
    else:
        density = topk_ratio
    row["sol_density"] = density
    # our budget: the most whole blocks per row that stay at or below Sol-Attn's density (never more blocks)
    nv = layout.num_video_blocks
    budget = max(1, math.floor(density * nv + 1e-9))
    mask = draft_mask(qp, kp, layout, DraftAttentionConfig(sparsity=1.0 - budget / nv, sink=False, k_min=1), scale)
    row["density"] = float(mask[..., :nv, :nv].float().mean())
    row["draft"] = _err(layout.unpermute(block_sparse_attention(qp, kp, vp, plan_from_mask(mask, layout),
                                                                scale=scale, backend="torch")), dense)
    for name, cfg in (("draft+rect (block)", PooledRectificationConfig()),
                      ("draft+row (mean)", PooledRectificationConfig(combine="row", row_keys="mean")),
                      ("draft+row", PooledRectificationConfig(combine="row"))):
        out = rectified_attention(qp, kp, vp, layout, cfg, scale, mask=mask, backend="torch")
        row[name] = _err(layout.unpermute(out), dense)
    return row


# ---------------------------------------------------------------------------------------------------- inputs
def family_inputs(seeds: int, layout: TokenLayout = FAMILY_LAYOUT, dim: int = 32):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from utils import FAMILIES, structured_family

    for family in FAMILIES:
        for seed in range(seeds):
            q, k, v = structured_family(layout, family, heads=2, dim=dim, seed=seed, dtype=torch.float32)
            yield family, f"seed {seed}", layout, (q, k, v), 1 / math.sqrt(dim)


class _Capture:
    """Stands in for the engine of the embedded model: records q, k, v at the chosen steps, returns dense."""

    def __init__(self, steps):
        self.steps, self.calls = set(steps), []

    def sparse_attention(self, query, key, value, *, layout, step=None, layer=None, branch=None, scale=None, **_):
        if step in self.steps:
            self.calls.append((f"layer {layer} step {step} {branch}", layout, query.detach().float().clone(),
                               key.detach().float().clone(), value.detach().float().clone(), scale))
        return _dense(query, key, value, scale).to(query.dtype)

    def runs_dense(self, **_):  # the processors ask first: every call reaches sparse_attention
        return False

    def reset(self):
        pass

    def masks(self):
        return {}

    stats = {}


def embedded_inputs(steps: int):
    """q, k, v of every self-attention layer of the embedded model at three steps of its first default prompt."""
    from dit_sparse import DraftAttentionConfig as Draft
    from dit_sparse import SparseAttentionConfig
    from dit_sparse.integration.apply import apply, get_runtime, remove, transformers_of
    from dit_sparse.tiny.model import DEFAULT_PROMPTS
    from dit_sparse.tools.render import Job, Renderer

    renderer = Renderer("embedded", progress=False)
    job = Job(prompt=DEFAULT_PROMPTS[0], seed=0, steps=steps)
    at = (1, steps // 2, steps - 1)
    cap = _Capture(at)
    apply(renderer.pipe, SparseAttentionConfig(draft=Draft(), tile=(1, 4, 4), block_size=16))
    try:
        for _, tr in transformers_of(renderer.pipe):
            get_runtime(tr).engine = cap
        with torch.no_grad():
            renderer.pipe(**renderer._call_kwargs(job))
    finally:
        remove(renderer.pipe)
    for case, layout, q, k, v, scale in cap.calls:
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        yield "embedded", case, layout, (q, k, v), scale


# ---------------------------------------------------------------------------------------------------- presets
def preset_groups() -> list[tuple[str, object, list[str]]]:
    """The real-model presets with pooled rectification, grouped by selection + rectification settings (dense
    policy and ``combine`` aside): ``[(label, SparseAttentionConfig, preset names)]``."""
    from dit_sparse import SparseAttentionConfig
    from dit_sparse.integration.pipelines.presets import TINY_PRESET_PREFIX, list_presets

    groups: dict = {}
    for p in list_presets():
        c = p.config
        if p.name.startswith(TINY_PRESET_PREFIX) or c.rectification is None or not c.rectification.rectify:
            continue
        rect = dataclasses.replace(c.rectification, combine="block")
        groups.setdefault((c.draft, c.neighborhood, rect), []).append(p.name)
    out = []
    for (draft, nb, rect), names in groups.items():
        sel = (f"draft {draft.sparsity:g}" if draft else "") + (" + window" if nb else "")
        label = (sel + " + rect" if sel else f"rect {rect.sparsity:g}")
        out.append((label, SparseAttentionConfig(draft=draft, neighborhood=nb, rectification=rect), names))
    return out


def evaluate_preset(q, k, v, layout: TokenLayout, config, *, scale: float) -> dict:
    """Errors vs dense of a preset's selection alone, block and row rectification on one mask (the preset's own
    selection on this input)."""
    from dit_sparse.methods.engine import SparseAttention

    qp, kp, vp = (layout.permute(t.float()) for t in (q, k, v))
    dense = _dense(q, k, v, scale)
    mask = SparseAttention(config).build_mask(qp, kp, layout, scale)
    nv = layout.num_video_blocks
    row = {"density": float(mask[..., :nv, :nv].float().mean())}
    rect = config.rectification
    for name, cfg in (("selection", dataclasses.replace(rect, rectify=False)),
                      ("block", dataclasses.replace(rect, combine="block")),
                      ("row", dataclasses.replace(rect, combine="row"))):
        out = rectified_attention(qp, kp, vp, layout, cfg, scale, mask=mask, backend="torch")
        row[name] = _err(layout.unpermute(out), dense)
    return row


def run_presets(steps: int, embedded: bool = True, layout: TokenLayout = PRESET_LAYOUT) -> dict:
    """The ``--presets`` comparison: rows per (group, input) and a summary per (group, source)."""
    inputs = list(family_inputs(1, layout, dim=128))
    if embedded:
        inputs += list(embedded_inputs(steps))
    groups = preset_groups()
    rows = []
    for label, config, _ in groups:
        for source, case, lay, (q, k, v), scale in inputs:
            r = evaluate_preset(q, k, v, lay, config, scale=scale)
            rows.append({"group": label, "source": source, "case": case, "block_size": lay.block_size, **r})
            print(f"{label:<20} {source:<12} {case:<24} density {r['density']:.3f} " + " ".join(
                f"{m}={r[m]:.4f}" for m in PRESET_VARIANTS), flush=True)
    summary = []
    for label, _, _ in groups:
        for source in dict.fromkeys(r["source"] for r in rows):
            sel = [r for r in rows if r["group"] == label and r["source"] == source]
            s = {"group": label, "source": source, "cases": len(sel),
                 "density": round(sum(r["density"] for r in sel) / len(sel), 3)}
            for m in PRESET_VARIANTS:
                s[m] = round(sum(r[m] for r in sel) / len(sel), 4)
            s["row/block"] = round(s["row"] / s["block"], 3) if s["block"] else None
            s["row/selection"] = round(s["row"] / s["selection"], 3) if s["selection"] else None
            s["row < block (cases)"] = sum(r["row"] < r["block"] for r in sel)
            s["row > selection (cases)"] = sum(r["row"] > r["selection"] for r in sel)
            summary.append(s)
    verdict = {label: {"presets": names, "row_wins_every_source": all(
        s["row"] < s["block"] for s in summary if s["group"] == label), "row_wins_every_case": all(
        r["row"] < r["block"] for r in rows if r["group"] == label)} for label, _, names in groups}
    return {"layout": {"grid": layout.grid, "tile": layout.tile, "block_size": layout.block_size,
                       "video_blocks": layout.num_video_blocks, "heads": 2, "head_dim": 128},
            "rows": rows, "summary": summary, "verdict": verdict}


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ratios", default="0.25,0.1", help="Sol-Attn topk_ratio values (our draft matches the "
                    "density Sol-Attn reaches)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the embedded capture")
    ap.add_argument("--no-embedded", action="store_true")
    ap.add_argument("--presets", action="store_true", help="the real-model presets: block vs row rectification on "
                    "their own selection (see the module docstring)")
    ap.add_argument("--smoke", action="store_true", help="tiny dry run: 2x16x16 grid, one seed, no embedded "
                    "capture, nothing written")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.no_embedded = 1, True
    torch.manual_seed(0)
    if args.presets:
        layout = TokenLayout(frames=1, height=16, width=24, block_size=16) if args.smoke else PRESET_LAYOUT
        result = run_presets(args.steps, embedded=not args.no_embedded, layout=layout)
        print()
        print_table(result["summary"], list(result["summary"][0]))
        for label, v in result["verdict"].items():
            print(f"{label}: row below block on every source: {v['row_wins_every_source']}, in every case: "
                  f"{v['row_wins_every_case']} ({', '.join(v['presets'])})")
        if args.smoke:
            return 0
        path = write_json("pooled-presets", {"environment": environment(), **result})
        write_markdown(result["summary"], RESULTS / "pooled-presets.md",
                       "Real-model presets' selection: relative L2 error vs dense (mean over cases) of the selection "
                       "alone, block and row rectification on the same mask; 2-core CPU, float32.")
        print(f"\nwrote {path}, {RESULTS / 'pooled-presets.md'}")
        return 0
    with_sol = has_comfy_kitchen()
    if not with_sol:
        print("comfy-kitchen is not installed (pip install comfy-kitchen): the sol-attn column is skipped")
    inputs = list(family_inputs(args.seeds, TokenLayout(frames=2, height=16, width=16, tile=(1, 8, 8))
                                if args.smoke else FAMILY_LAYOUT))
    if not args.no_embedded:
        inputs += list(embedded_inputs(args.steps))
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for source, case, layout, (q, k, v), scale in inputs:
            r = evaluate(q, k, v, layout, scale=scale, topk_ratio=ratio, with_sol=with_sol)
            rows.append({"topk_ratio": ratio, "source": source, "case": case, **r})
            print(f"ratio {ratio} {source:<12} {case:<24} " + " ".join(
                f"{m}={r[m]:.3f}" for m in METHODS if m in r) + f" density ours {r['density']:.3f} "
                f"sol {r['sol_density']:.3f}", flush=True)
    summary = summarise(rows, with_sol)
    print()
    print_table(summary, list(summary[0]))
    if args.smoke:
        return 0
    payload = {"environment": environment(), "with_sol": with_sol, "rows": rows, "summary": summary}
    path = write_json("pooled-peers", payload)
    write_markdown(summary, RESULTS / "pooled-peers.md")
    print(f"\nwrote {path}, {RESULTS / 'pooled-peers.md'}")
    return 0


def summarise(rows, with_sol: bool):
    out = []
    methods = [m for m in METHODS if with_sol or m != "sol-attn"]
    keys = sorted({(r["topk_ratio"], r["source"]) for r in rows}, key=lambda x: (-x[0], x[1]))
    for ratio, source in keys:
        sel = [r for r in rows if r["topk_ratio"] == ratio and r["source"] == source]
        s = {"topk_ratio": ratio, "source": source, "cases": len(sel),
             "density ours": round(sum(r["density"] for r in sel) / len(sel), 3),
             "density sol": round(sum(r["sol_density"] for r in sel) / len(sel), 3) if with_sol else None}
        for m in methods:
            s[m] = round(sum(r[m] for r in sel) / len(sel), 4)
        s["row/draft"] = round(s["draft+row"] / s["draft"], 3)
        s["row worse than draft (cases)"] = sum(r["draft+row"] > r["draft"] for r in sel)
        if with_sol:
            s["row above sol (cases)"] = sum(r["draft+row"] > r["sol-attn"] for r in sel)
        out.append(s)
    return out


def write_markdown(summary, path: Path, title: str = "Relative L2 error of the attention output vs dense (mean over "
                   "cases), at Sol-Attn's measured density; 2-core CPU, float32.") -> None:
    cols = list(summary[0])
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s[c]) for c in cols) + " |" for s in summary]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
