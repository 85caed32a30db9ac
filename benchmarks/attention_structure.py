"""How structured is the self-attention of the embedded tiny Wan model, compared with random weights?

For every self-attention call (``attn1`` of every block, both CFG branches, every denoising step) of a real
``WanPipeline`` render at the default resolution (17 x 64 x 64 -> 5 x 8 x 8 = 320 video tokens), a recording
processor computes the exact attention probabilities (same projections, RMS norms and RoPE as diffusers'
``WanAttnProcessor``; the output is ``P @ V``, identical to the stock processor up to rounding). Tokens are grouped
into key/query blocks of ``block`` tokens using the tile :func:`dit_sparse.layout.pick_tile` picks for the grid;
for each query block the mass of every key block is the mean over its queries of the summed probabilities. The
headline number is the share of attention mass held by the top 10% of key blocks (rounded up) per query block,
averaged over query blocks, heads, layers, steps, branches and prompts. The same for a model with the same config
and random transformer weights (same trained VAE/text encoder, same prompts and seeds) is the baseline; uniform
attention would give ``top_k / num_blocks``.

    python benchmarks/attention_structure.py        # table + benchmarks/results/attention_structure-cpu.json
    python benchmarks/attention_structure.py --steps 8 --prompts 2 --no-write
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, write_json  # noqa: E402
from dit_sparse.layout import pick_tile  # noqa: E402


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def block_ids(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Block index of every video token (raster order ``f*H*W + y*W + x``) for a tile ``(tT, tH, tW)``."""
    f, h, w = grid
    tt, th, tw = tile
    nh, nw = -(-h // th), -(-w // tw)
    ff, yy, xx = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    return (((ff // tt) * nh + yy // th) * nw + xx // tw).flatten()


class Recorder:
    """Accumulates top-k block mass statistics of self-attention probabilities."""

    def __init__(self, blocks=(8, 16, 32), fractions=(0.1, 0.2)):
        self.blocks, self.fractions = blocks, fractions
        self.grid = None
        self.sums: dict[tuple[int, float], float] = {}
        self.uniform: dict[tuple[int, float], float] = {}
        self.token_top10 = 0.0
        self.entropy = 0.0
        self.count = 0
        self.per_layer: dict[int, list[float]] = {}

    def pre_hook(self, module, args, kwargs):
        hs = kwargs["hidden_states"]
        pt, ph, pw = module.config.patch_size
        self.grid = (hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw)

    def add(self, probs: torch.Tensor, layer: int) -> None:
        """``probs``: [B, H, N, N] (rows sum to 1)."""
        n = probs.shape[-1]
        if self.grid is None or math.prod(self.grid) != n:
            raise RuntimeError(f"grid {self.grid} does not match {n} tokens")
        p = probs.double().flatten(0, 1)  # [BH, N, N]
        for b in self.blocks:
            tile = pick_tile(*self.grid, block_size=b)
            ids = block_ids(self.grid, tile)
            nb = int(ids.max()) + 1
            onehot = F.one_hot(ids, nb).double()  # [N, nb]
            key_mass = p @ onehot  # [BH, N, nb]: per query, the mass of each key block
            counts = onehot.sum(0)  # tokens per block
            blk = (onehot.t() @ key_mass) / counts.view(1, -1, 1)  # [BH, nb_q, nb_k] mean over queries
            for frac in self.fractions:
                k = max(1, math.ceil(frac * nb))
                top = blk.topk(k, dim=-1).values.sum(-1).mean().item()
                self.sums[(b, frac)] = self.sums.get((b, frac), 0.0) + top
                self.uniform[(b, frac)] = k / nb
                if b == 16 and frac == 0.1:
                    self.per_layer.setdefault(layer, []).append(top)
        k = max(1, math.ceil(0.1 * n))
        self.token_top10 += p.topk(k, dim=-1).values.sum(-1).mean().item()
        self.entropy += (-(p.clamp_min(1e-30).log() * p).sum(-1).mean() / math.log(n)).item()
        self.count += 1

    def result(self) -> dict:
        c = max(1, self.count)
        out = {"calls": self.count, "grid": list(self.grid) if self.grid else None,
               "token_top10_mass": self.token_top10 / c, "normalized_entropy": self.entropy / c, "blocks": {}}
        for (b, frac), s in sorted(self.sums.items()):
            tile = pick_tile(*self.grid, block_size=b)
            out["blocks"][f"block{b}_top{int(frac * 100)}"] = {
                "block_size": b, "tile": list(tile), "top_fraction": frac, "mass": s / c,
                "uniform": self.uniform[(b, frac)]}
        out["per_layer_block16_top10"] = {str(k): sum(v) / len(v) for k, v in sorted(self.per_layer.items())}
        return out


class RecordingWanSelfAttn:
    """Self-attention (``attn1``) processor: stock Wan math, explicit probabilities, recorded."""

    def __init__(self, recorder: Recorder, layer: int):
        self.recorder, self.layer = recorder, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        self.recorder.add(probs, self.layer)
        out = (probs @ v).transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def measure(pipe, prompts, steps: int, seed: int, call: dict) -> dict:
    rec = Recorder()
    tr = pipe.transformer
    procs = {}
    for name, proc in tr.attn_processors.items():
        if ".attn1." in name:
            layer = int(name.split(".")[1])
            procs[name] = RecordingWanSelfAttn(rec, layer)
        else:
            procs[name] = proc
    stock = dict(tr.attn_processors)
    tr.set_attn_processor(procs)
    handle = tr.register_forward_pre_hook(rec.pre_hook, with_kwargs=True)
    try:
        for i, p in enumerate(prompts):
            pipe(p, negative_prompt="", generator=torch.Generator().manual_seed(seed + i),
                 **{**call, "num_inference_steps": steps})
    finally:
        handle.remove()
        tr.set_attn_processor(stock)
    return rec.result()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="tiny Wan folder (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: DEFAULT_CALL's)")
    ap.add_argument("--prompts", type=int, default=3, help="how many DEFAULT_PROMPTS to render")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dit_sparse.tiny import model as tm

    call = dict(tm.DEFAULT_CALL)
    steps = args.steps or call["num_inference_steps"]
    prompts = tm.DEFAULT_PROMPTS[: args.prompts]
    trained = tm.build_pipeline(args.weights)
    random_pipe = tm.build_random_pipeline(seed=args.seed, vae=trained.vae, text_encoder=trained.text_encoder)
    random_pipe.scheduler = trained.scheduler
    random_pipe.set_progress_bar_config(disable=True)

    t0 = time.time()
    res = {"trained": measure(trained, prompts, steps, args.seed, call)}
    t1 = time.time()
    res["random"] = measure(random_pipe, prompts, steps, args.seed, call)
    payload = {"benchmark": "attention_structure", "environment": environment(), "prompts": prompts,
               "steps": steps, "call": {k: v for k, v in call.items() if k != "output_type"},
               "seconds_trained": round(t1 - t0, 2), "results": res,
               "headline": {"trained_block16_top10": res["trained"]["blocks"]["block16_top10"]["mass"],
                            "random_block16_top10": res["random"]["blocks"]["block16_top10"]["mass"],
                            "uniform_block16_top10": res["trained"]["blocks"]["block16_top10"]["uniform"]}}

    print(f"self-attention, grid {res['trained']['grid']} ({math.prod(res['trained']['grid'])} tokens), "
          f"{len(prompts)} prompts x {steps} steps x 2 CFG branches x {len(res['trained']['per_layer_block16_top10'])}"
          f" layers")
    print(f"{'statistic':<28}{'trained':>10}{'random':>10}{'uniform':>10}")
    for key, t in res["trained"]["blocks"].items():
        r = res["random"]["blocks"][key]
        name = key + " " + "x".join(map(str, t["tile"]))
        print(f"{name:<28}{t['mass']:>10.3f}{r['mass']:>10.3f}{t['uniform']:>10.3f}")
    print(f"{'token top10 mass':<28}{res['trained']['token_top10_mass']:>10.3f}"
          f"{res['random']['token_top10_mass']:>10.3f}{0.1:>10.3f}")
    print(f"{'normalized entropy':<28}{res['trained']['normalized_entropy']:>10.3f}"
          f"{res['random']['normalized_entropy']:>10.3f}{1.0:>10.3f}")
    per_layer = {kind: {k: round(v, 3) for k, v in res[kind]["per_layer_block16_top10"].items()}
                 for kind in ("trained", "random")}
    print("per layer (block16 top10): trained", per_layer["trained"], "random", per_layer["random"])
    if not args.no_write:
        print("wrote", write_json("attention_structure", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
