"""Training recipe of the embedded tiny text-to-video model (:mod:`dit_sparse.tiny.model`), CPU-only.

    python -m dit_sparse.tiny.train --out dit_sparse/tiny/assets/tiny_wan --minutes 25 \
        --samples samples/tiny_model_default

Everything is generated: the data are :mod:`dit_sparse.tiny.synthetic` clips (one coloured circle / square / triangle
moving left, right, up, down or bouncing on a dark background, 17 frames x 64 x 64) with their prompts ("a red
circle moving right"). Seeds are fixed (numpy + torch); runs are bounded by wall-clock time, so the number of
steps (and hence the exact weights) depends on the machine's speed (``--steps-vae`` / ``--steps-dit`` bound by
steps instead). By default two data-parallel processes (gloo) with one torch thread each: on a shared 2-core
machine that was about 2x faster than one process, while one process with 2 intra-op threads was erratic (2-10x
slower whenever another job held a core).

Stages (``--minutes`` is split: 22% VAE, the encoding, the rest transformer, ``--reserve`` for the final check):

1. **VAE** (``AutoencoderKLWan``, :data:`~dit_sparse.tiny.model.VAE_CONFIG`), trained as a plain autoencoder
   through its real causal, chunked ``encode``/``decode`` path on random 9-frame windows of synthetic clips
   (32 x 32 crops around the object; every 4th step two full 64 x 64 windows). Loss: foreground-weighted L1 + MSE
   (object pixels count 5x), latent noise (5% of the latent RMS) so that the decoder tolerates imperfect
   diffusion outputs, a 1e-4 L2 pull on the latent mean. Adam 2e-3, cosine decay, clip 1.0, batch 8 per process.
   Then ``latents_mean`` / ``latents_std`` are measured per channel on the stage-2 data and written into the VAE
   config (``WanPipeline`` un-normalises with them before decoding).
2. **Latent dataset**: ``--clips`` (1000) clips, every prompt equally often, placement drawn with
   ``spread=0.4`` (:func:`~dit_sparse.tiny.synthetic.random_spec`: linear motions start near the edge they leave,
   bounces near the centre), encoded once (posterior mean) and normalised.
3. **Transformer** (``WanTransformer3DModel``, :data:`~dit_sparse.tiny.model.TRANSFORMER_CONFIG`) with the
   rectified-flow objective that ``FlowMatchEulerDiscreteScheduler`` integrates in ``WanPipeline``:
   ``x_t = (1 - s) x_0 + s eps``, timestep ``1000 s``, target ``eps - x_0``. ``s``: ``u`` from a logit-normal
   (mean ``--sigma-mean`` 0.5, 70%) or uniform (30%), shifted like the scheduler (``s = 3u / (1 + 2u)``). MSE with
   object latents weighted ``1 + --fg-weight`` (3; tokens far from the frame's median background latent).
   Conditioning: the frozen random UMT5 embeddings exactly as ``WanPipeline.encode_prompt`` computes them,
   zero-padded to a length drawn from 16..512 per step (any ``max_sequence_length`` works), replaced by the empty
   prompt 10% of the time (classifier-free guidance). AdamW 1.5e-3 (betas 0.9/0.99, wd 0.01 on matrices), 50
   warm-up steps, cosine to 5%, clip 1.0, batch 8 per process, EMA (decay up to 0.995); the EMA is shipped.

Checkpoints: the diffusers folder ``--out`` is rewritten every ``--save-every`` minutes (usable at any time, float16
weights), the resumable state goes to ``--work`` (default ``<tmp>/dit_sparse_tiny_wan_work``, not shipped);
``--resume --vae-checkpoint <work>/vae_stage1.pt`` continues stage 3 with a fresh schedule. Losses are printed as
running means; every ``--eval-every`` minutes the default prompts are sampled and checked with
:func:`dit_sparse.tiny.synthetic.matches_prompt`; the end writes ``training_summary.json`` into ``--out``.

**The shipped run** (2 shared CPU cores, torch 2.13 CPU, 2 processes x 1 thread, about 27 min wall clock):

* the command above; VAE 627 steps in 5.5 min (l1 / MSE in [-1, 1] units at step 100: 0.583 / 0.143,
  300: 0.231 / 0.054, 600: 0.152 / 0.029; held-out full-clip MSE 0.0027 in [0, 1] units); 1000 clips encoded in
  25 s; transformer losses (object-weighted) at step 100: 1.47, 200: 0.73, 300: 0.53, 400: 0.45, 500: 0.40
  (evals: motion 2/6 at step 283, 4/6 at 523). The processes were then killed from outside (not by the recipe)
  at step ~525, so
* ``--resume --vae-checkpoint ... --minutes 11 --reserve 0.3 --lr 1.1e-3`` continued from the step-402
  checkpoint: 1025 more steps in 10.2 min, losses 0.37 (+200), 0.30 (+400), 0.28 (+600), 0.25 (+800), 0.20
  (+1000), final running loss 0.216; evals 6/6 colour and 6/6 motion from step 814 on.
* Total: 1427 transformer steps x 2 processes x 8 = 22.8 k samples. ``training_summary.json`` in the folder
  holds both segments (the first reconstructed from its log).

Result (default call, all 75 prompts x 2 seeds): colour 150/150, motion direction 150/150, shape 88/150 (square
41 and triangle 21 misses: squares come out rounded). Attention (``benchmarks/attention_structure.py``): the top 10%
of 16-token key blocks hold 34% of the self-attention mass per query block (random weights: 12%, uniform: 10%).

Design notes (what was measured before this recipe):

* A Wan2.1-layout VAE (no residual shortcuts, no pixel shuffle) reached only MSE 0.012 in 5 min and got colours
  wrong; the Wan2.2 residual + ``patch_size=2`` layout trains several times faster per minute.
* An earlier design with temporal compression 2 and transformer patch (1, 2, 2) (9 x 8 x 8 = 576 tokens,
  motion of half a token per latent frame) learned colour in 200 steps but ignored the direction word after 1600
  steps (it moved every object the same way). Wan has no absolute position embedding (3-D RoPE only), so
  direction must be learned as a text-gated relative shift; with temporal compression 4 and patch 1 the object
  moves one token per latent frame and the VAE latent also carries the within-chunk motion, and direction was
  learned within ~800 steps (at half the cost per step).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import model as tm
from . import synthetic as syn

FRAMES, HEIGHT, WIDTH = 17, 64, 64
#: placement randomness of the transformer's training clips (see :func:`dit_sparse.tiny.synthetic.random_spec`)
SPREAD = 0.4
_PAD_LENGTHS = (16, 24, 32, 64, 128, 256, 512)
_PAD_WEIGHTS = (0.2, 0.1, 0.25, 0.1, 0.1, 0.1, 0.15)


class Dist:
    """Data parallelism over ``world`` CPU processes (gloo); every call is a no-op for one process.

    Each process computes the loss of its own batch; gradients are averaged with one all-reduce, so all replicas
    stay identical. Rank 0 owns the clock (the stop decision and schedule progress are broadcast from it),
    logging, checkpoints and evaluation.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.main:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def control(self, stop: bool, progress: float) -> tuple[bool, float]:
        if self.world == 1:
            return stop, progress
        t = torch.tensor([float(stop), progress], dtype=torch.float64)
        dist.broadcast(t, 0)
        return bool(t[0].item()), float(t[1].item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_list(self, items: list) -> list:
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]


#: the one-process default (no communication)
SINGLE = Dist()


def _cosine(progress: float, warm: float, floor: float) -> float:
    if progress < warm:
        return max(progress / warm, 0.02)
    p = min(1.0, (progress - warm) / max(1e-8, 1 - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


# ------------------------------------------------------------------------------------------------- stage 1: VAE


def _vae_batch(rng: np.random.Generator, full: bool, batch: int, window: int = 9, crop: int = 32) -> torch.Tensor:
    """[B, 3, window, h, w] in [-1, 1]: random windows of synthetic clips, cropped around the object."""
    out = []
    for _ in range(batch):
        spec = syn.random_spec(rng)
        clip = syn.make_clip(spec, FRAMES, HEIGHT, WIDTH)  # [F, H, W, 3]
        s = int(rng.integers(0, FRAMES - window + 1))
        clip = clip[s:s + window]
        if not full:
            track = syn.trajectory(spec, FRAMES)[s:s + window]
            cx, cy = track[int(rng.integers(window))] * np.array([WIDTH, HEIGHT])
            x0 = int(np.clip(cx - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, WIDTH - crop)) // 4 * 4
            y0 = int(np.clip(cy - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, HEIGHT - crop)) // 4 * 4
            clip = clip[:, y0:y0 + crop, x0:x0 + crop]
        out.append(clip)
    return torch.stack(out).permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


def _vae_loss(vae, x: torch.Tensor, noise_rel: float = 0.05):
    mu = vae.encode(x).latent_dist.mean
    rms = mu.detach().pow(2).mean().sqrt().clamp_min(1e-3)
    z = mu + noise_rel * rms * torch.randn_like(mu)
    y = vae.decode(z).sample
    bg = torch.tensor(syn.BACKGROUND).view(1, 3, 1, 1, 1) * 2 - 1
    w = 1.0 + 4.0 * ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
    l1 = (w * (y - x).abs()).mean()
    l2 = (w * (y - x).square()).mean()
    reg = 1e-4 * mu.square().mean()
    return l1 + l2 + reg, {"l1": l1.item(), "mse": (y - x).square().mean().item(), "rms": rms.item()}


def train_vae(vae, minutes: float, max_steps: int, seed: int, work: Path, dd: Dist = SINGLE) -> dict:
    rng = np.random.default_rng(seed + 1 + 1000 * dd.rank)
    torch.manual_seed(seed + 1 + 1000 * dd.rank)
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=2e-3, betas=(0.9, 0.99))
    t0, step, hist, run = time.time(), 0, [], None
    budget = minutes * 60
    while True:
        stop, prog = dd.control(step >= max_steps or time.time() - t0 >= budget,
                                max(step / max_steps, (time.time() - t0) / budget))
        if stop:
            break
        for g in opt.param_groups:
            g["lr"] = 2e-3 * _cosine(prog, 0.03, 0.05)
        full = step % 4 == 3
        x = _vae_batch(rng, full, 2 if full else 8)
        loss, parts = _vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dd.sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run = parts if run is None else {k: 0.95 * run[k] + 0.05 * v for k, v in parts.items()}
        step += 1
        if step % 25 == 0:
            hist.append({"step": step, "min": round((time.time() - t0) / 60, 2),
                         **{k: round(v, 5) for k, v in run.items()}})
            dd.log(f"vae step {step:5d}  l1 {run['l1']:.4f}  mse {run['mse']:.5f}  latent rms {run['rms']:.3f}  "
                   f"{(time.time() - t0) / step:.2f} s/step")
    vae.eval().requires_grad_(False)
    # held-out reconstruction on full clips
    with torch.no_grad():
        specs = [syn.random_spec(np.random.default_rng(seed + 99 + i)) for i in range(4)]
        x = syn.make_batch(specs, FRAMES, HEIGHT, WIDTH)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec_mse = float((y - x).square().mean() / 4)  # in [0, 1] units
        ok = sum(all(syn.matches_prompt((y[i].permute(1, 2, 3, 0) + 1) / 2, syn.prompt_of(s))[k]
                     for k in ("colour", "shape", "motion")) for i, s in enumerate(specs))
    dd.log(f"vae done: {step} steps x {dd.world} procs in {(time.time() - t0) / 60:.1f} min, held-out full-clip MSE "
           f"{rec_mse:.5f} ([0,1] units), {ok}/4 reconstructions recognised")
    if dd.main:
        torch.save(vae.state_dict(), work / "vae_stage1.pt")
    return {"steps": step, "procs": dd.world, "minutes": round((time.time() - t0) / 60, 2), "heldout_mse": rec_mse,
            "heldout_recognised": f"{ok}/4", "curve": hist}


# --------------------------------------------------------------------------------------- stage 2: latent dataset


def encode_dataset(vae, clips: int, seed: int, dd: Dist = SINGLE, batch: int = 8, spread: float = SPREAD):
    """Encode ``clips`` synthetic clips (every prompt equally often); returns raw latents [N, C, f, h, w], prompts."""
    rng = np.random.default_rng(seed + 2)
    prompts_all = syn.all_prompts()
    order = []
    while len(order) < clips:
        order.extend(rng.permutation(len(prompts_all)).tolist())
    order = order[: clips - clips % dd.world]
    specs = []
    for j in order:
        ref = syn.parse_prompt(prompts_all[j])
        specs.append(syn.random_spec(rng, ref.colour, ref.shape, ref.motion, spread=spread))
    mine = specs[dd.rank::dd.world]
    lat, t0 = [], time.time()
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            lat.append(vae.encode(syn.make_batch(mine[i:i + batch], FRAMES, HEIGHT, WIDTH)).latent_dist.mean)
    lat = dd.gather(torch.cat(lat))
    prompts = dd.gather_list([syn.prompt_of(s) for s in mine])
    dd.log(f"dataset: {len(prompts)} clips encoded to {tuple(lat.shape[1:])} in {time.time() - t0:.0f} s")
    return lat, prompts


# ------------------------------------------------------------------------------------------ stage 3: transformer


def prompt_table(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Unpadded text embeddings [L, D] exactly as ``WanPipeline.encode_prompt`` computes them."""
    table = {}
    with torch.no_grad():
        for p in sorted(set(prompts) | {""}):
            e = pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=32, device="cpu")[0][0]
            n = int(len(pipe.tokenizer(p).input_ids))
            table[p] = e[:n].clone()
    return table


def _pad(embs: list[torch.Tensor], length: int) -> torch.Tensor:
    out = torch.zeros(len(embs), length, embs[0].shape[-1])
    for i, e in enumerate(embs):
        out[i, : e.shape[0]] = e[:length]
    return out


def sample_sigmas(gen: torch.Generator, n: int, shift: float, mean: float = 0.0) -> torch.Tensor:
    u = torch.sigmoid(torch.randn(n, generator=gen) + mean)
    uni = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.3
    u = torch.where(pick, uni, u).clamp(1e-3, 1 - 1e-3)
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def evaluate(pipe, prompts: list[str], steps: int = 10, seed: int = 0) -> dict:
    """Sample each prompt and check it with :func:`dit_sparse.tiny.synthetic.matches_prompt`."""
    res = {"colour": 0, "shape": 0, "motion": 0, "n": len(prompts), "per_prompt": {}}
    for i, p in enumerate(prompts):
        call = {**tm.DEFAULT_CALL, "num_inference_steps": steps}
        v = pipe(p, negative_prompt=tm.DEFAULT_NEGATIVE_PROMPT, generator=torch.Generator().manual_seed(seed + i),
                 **call).frames[0]
        m = syn.matches_prompt(v, p)
        for k in ("colour", "shape", "motion"):
            res[k] += int(m[k])
        d = m["described"]
        res["per_prompt"][p] = f"{d['colour']} {d['shape']} {d['motion']}"
    return res


def train_transformer(pipe, lat: torch.Tensor, prompts: list[str], minutes: float, max_steps: int, seed: int,
                      work: Path, out: Path, save_every: float, eval_every: float, batch: int = 8,
                      lr: float = 1e-3, dd: Dist = SINGLE, resume: dict | None = None, fg_weight: float = 0.0,
                      sigma_mean: float = 0.0) -> dict:
    transformer = pipe.transformer
    if resume is not None:
        transformer.load_state_dict(resume["model"])
    shift = float(pipe.scheduler.config.shift)
    table = prompt_table(pipe, prompts)
    gen = torch.Generator().manual_seed(seed + 3 + 1000 * dd.rank)
    torch.manual_seed(seed + 3 + 1000 * dd.rank)
    transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    if resume is not None:
        ema.load_state_dict(resume["ema"])
    step0 = resume["step"] if resume is not None else 0
    params = list(transformer.parameters())
    decay_params = [p for p in params if p.ndim >= 2]
    other_params = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01},
                             {"params": other_params, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    n = lat.shape[0]
    t0, step, run, hist, evals = time.time(), 0, None, [], []
    last_save = last_eval = time.time()
    budget = minutes * 60
    while True:
        stop, prog = dd.control(step >= max_steps or time.time() - t0 >= budget,
                                max(step / max_steps, (time.time() - t0) / budget))
        if stop:
            break
        for g in opt.param_groups:
            g["lr"] = lr * (min(1.0, (step + 1) / 50) if step < 50 else _cosine(prog, 0.0, 0.05))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = lat[idx]
        texts = [prompts[i] if torch.rand(1, generator=gen).item() > 0.1 else "" for i in idx.tolist()]
        length = _PAD_LENGTHS[int(torch.multinomial(torch.tensor(_PAD_WEIGHTS), 1, generator=gen))]
        ctx = _pad([table[t] for t in texts], length)
        sig = sample_sigmas(gen, batch, shift, sigma_mean)
        eps = torch.randn(x0.shape, generator=gen)
        s = sig.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = transformer(hidden_states=xt, timestep=sig * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        if fg_weight > 0:
            # object tokens: latent positions far from the frame's (median) background latent
            bg = x0.flatten(3).median(dim=-1).values[..., None, None]
            fg = ((x0 - bg).abs().amax(dim=1, keepdim=True) > 1.0).float()
            w = 1.0 + fg_weight * fg
            loss = (w * (pred - (eps - x0)).square()).mean() / w.mean()
        else:
            loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dd.sync_grads(params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        step += 1
        d = min(0.995, (1 + step0 + step) / (10 + step0 + step))
        with torch.no_grad():
            for pe, pt in zip(ema.parameters(), params):
                pe.lerp_(pt, 1 - d)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 25 == 0:
            hist.append({"step": step, "min": round((time.time() - t0) / 60, 2), "loss": round(run, 5)})
            dd.log(f"dit step {step:5d}  loss {run:.4f}  grad {gnorm:.2f}  lr {opt.param_groups[0]['lr']:.2e}  "
                   f"{(time.time() - t0) / step:.2f} s/step")
        if not dd.main:
            continue
        now = time.time()
        if now - last_save > save_every * 60:
            _export(pipe, ema, out)
            torch.save({"step": step0 + step, "model": transformer.state_dict(), "ema": ema.state_dict()},
                       work / "transformer_state.pt")
            last_save = now
        if now - last_eval > eval_every * 60:
            r = _eval_with(pipe, ema)
            evals.append({"step": step, **{k: r[k] for k in ("colour", "shape", "motion", "n")}})
            dd.log(f"eval @ {step}: colour {r['colour']}/{r['n']} shape {r['shape']}/{r['n']} motion "
                   f"{r['motion']}/{r['n']}  {r['per_prompt']}")
            last_eval = time.time()
    final = dd.mean(run or 0.0)
    dd.log(f"dit done: {step} steps x {dd.world} procs (batch {batch} each) in {(time.time() - t0) / 60:.1f} min, "
           f"final running loss {final:.4f}")
    if dd.main:
        _export(pipe, ema, out)
        torch.save({"step": step0 + step, "model": transformer.state_dict(), "ema": ema.state_dict()},
                   work / "transformer_state.pt")
    return {"steps": step, "resumed_from_step": step0, "procs": dd.world, "batch_per_proc": batch,
            "minutes": round((time.time() - t0) / 60, 2),
            "final_loss": final, "curve": hist, "evals": evals}


@torch.no_grad()
def write_samples(pipe, prompts: list[str], png: str | os.PathLike, gif: str | os.PathLike | None = None,
                  frames: tuple[int, ...] = (0, 4, 8, 12, 16), seed: int = 0, scale: int = 2) -> list[dict]:
    """Render ``prompts`` with :data:`~dit_sparse.tiny.model.DEFAULT_CALL`; one PNG row per prompt (the listed
    frames side by side, upscaled ``scale`` x) and optionally an animated GIF of all prompts in a grid."""
    import imageio.v2 as imageio

    videos, checks = [], []
    for i, p in enumerate(prompts):
        v = pipe(p, negative_prompt=tm.DEFAULT_NEGATIVE_PROMPT, generator=torch.Generator().manual_seed(seed + i),
                 **tm.DEFAULT_CALL).frames[0]
        videos.append(v)
        m = syn.matches_prompt(v, p)
        checks.append({"prompt": p, **{k: m[k] for k in ("colour", "shape", "motion")},
                       "described": {k: m["described"][k] for k in ("colour", "shape", "motion")}})
    sep = np.full((videos[0].shape[1], 2, 3), 0.5, dtype=np.float32)
    rows = [np.concatenate(sum([[v[j], sep] for j in frames if j < len(v)], [])[:-1], axis=1) for v in videos]
    hsep = np.full((2, rows[0].shape[1], 3), 0.5, dtype=np.float32)
    grid = np.concatenate(sum([[r, hsep] for r in rows], [])[:-1], axis=0)
    grid = np.kron(grid, np.ones((scale, scale, 1), dtype=np.float32))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(png, (np.clip(grid, 0, 1) * 255).round().astype(np.uint8))
    if gif is not None:
        cols = 3
        blank = np.zeros_like(videos[0])
        padded = videos + [blank] * (-len(videos) % cols)
        lines = [np.concatenate(padded[i:i + cols], axis=2) for i in range(0, len(padded), cols)]
        anim = np.concatenate(lines, axis=1)  # [F, H*rows, W*cols, 3]
        imageio.mimsave(gif, [(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in anim], duration=0.12,
                        loop=0)
    return checks


def _eval_with(pipe, ema):
    live = pipe.transformer
    pipe.transformer = ema
    try:
        return evaluate(pipe, tm.DEFAULT_PROMPTS)
    finally:
        pipe.transformer = live


def _export(pipe, ema, out: Path) -> None:
    live = pipe.transformer
    pipe.transformer = ema
    try:
        tm.save_pipeline(pipe, out)
    finally:
        pipe.transformer = live


# ------------------------------------------------------------------------------------------------------- main


def run(args, dd: Dist = SINGLE) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "dit_sparse_tiny_wan_work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary: dict = {"args": vars(args), "torch": torch.__version__, "threads_per_proc": torch.get_num_threads()}

    vae = tm.build_vae(args.seed)
    pipe = tm.build_random_pipeline(args.seed, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    for name, module in (("transformer", pipe.transformer), ("vae", vae), ("text_encoder", pipe.text_encoder)):
        summary[f"{name}_params"] = sum(p.numel() for p in module.parameters())
    dd.log(f"params: transformer {summary['transformer_params']:,}  vae {summary['vae_params']:,}  "
           f"text encoder {summary['text_encoder_params']:,}; {dd.world} process(es) x {args.threads} thread(s)")

    if args.vae_checkpoint:
        vae.load_state_dict(torch.load(args.vae_checkpoint))
        vae.eval().requires_grad_(False)
        dd.log(f"stage 1: reusing {args.vae_checkpoint}")
        summary["vae"] = {"reused": str(args.vae_checkpoint)}
    else:
        summary["vae"] = train_vae(vae, args.minutes * args.vae_share, args.steps_vae, args.seed, work, dd)

    lat, prompts = encode_dataset(vae, args.clips, args.seed, dd)
    mean = lat.mean(dim=(0, 2, 3, 4))
    std = lat.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])
    lat = (lat - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    summary["dataset"] = {"clips": len(prompts), "latent_shape": list(lat.shape[1:]), "spread": SPREAD}

    resume = None
    if args.resume:
        resume = torch.load(work / "transformer_state.pt")
        dd.log(f"stage 3: resuming from step {resume['step']} ({work / 'transformer_state.pt'})")
    remaining = args.minutes - (time.time() - t_start) / 60 - args.reserve
    summary["transformer"] = train_transformer(pipe, lat, prompts, max(0.5, remaining), args.steps_dit, args.seed,
                                               work, out, args.save_every, args.eval_every, args.batch, args.lr, dd,
                                               resume, args.fg_weight, args.sigma_mean)
    summary["train_minutes"] = round((time.time() - t_start) / 60, 2)
    if not dd.main:
        return summary
    final = tm.build_pipeline(out)
    r = evaluate(final, tm.DEFAULT_PROMPTS, steps=args.eval_steps)
    summary["final_eval"] = r
    dd.log(f"final eval ({args.eval_steps} steps): colour {r['colour']}/{r['n']} shape "
           f"{r['shape']}/{r['n']} motion {r['motion']}/{r['n']}  {r['per_prompt']}")
    if args.samples:
        summary["samples"] = write_samples(final, tm.DEFAULT_PROMPTS, args.samples + ".png", args.samples + ".gif")
    summary["total_minutes"] = round((time.time() - t_start) / 60, 2)
    previous = out / "training_summary.json"
    if args.resume and previous.is_file():
        summary["previous_segment"] = json.loads(previous.read_text())
    summary["folder_bytes"] = tm.folder_size(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    dd.log(f"wrote {out} ({summary['folder_bytes'] / 1e6:.2f} MB) in {summary['total_minutes']} min total")
    return summary


def _worker(rank: int, args, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.procs)
    try:
        run(args, Dist(rank, args.procs))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(tm.ASSET_DIR), help="diffusers folder to write (the shipped weights)")
    ap.add_argument("--work", default=None, help="training state folder (default: <tmp>/dit_sparse_tiny_wan_work)")
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the training stages")
    ap.add_argument("--reserve", type=float, default=1.0, help="minutes of --minutes kept for the final eval")
    ap.add_argument("--vae-share", type=float, default=0.22, help="share of --minutes for the VAE")
    ap.add_argument("--steps-vae", type=int, default=10**9)
    ap.add_argument("--steps-dit", type=int, default=10**9)
    ap.add_argument("--clips", type=int, default=1000, help="clips in the latent dataset")
    ap.add_argument("--batch", type=int, default=8, help="transformer batch per process")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="transformer peak learning rate")
    ap.add_argument("--fg-weight", type=float, default=3.0,
                    help="extra loss weight of object latents (1 + w on tokens far from the background latent)")
    ap.add_argument("--sigma-mean", type=float, default=0.5,
                    help="mean of the logit-normal noise-level draw (higher: more high-noise training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--procs", type=int, default=2, help="data-parallel processes (gloo, CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (one per core beats intra-op threads on a shared machine)")
    ap.add_argument("--save-every", type=float, default=3.0, help="minutes between checkpoints")
    ap.add_argument("--eval-every", type=float, default=4.0, help="minutes between sample checks")
    ap.add_argument("--eval-steps", type=int, default=tm.DEFAULT_CALL["num_inference_steps"],
                    help="denoising steps of the final check")
    ap.add_argument("--samples", default=None, help="write <samples>.png / .gif of the default prompts at the end")
    ap.add_argument("--vae-checkpoint", default=None, help="skip stage 1: load this VAE state dict instead")
    ap.add_argument("--resume", action="store_true",
                    help="continue the transformer (and its EMA) from <work>/transformer_state.pt (with a new LR "
                         "schedule); combine with --vae-checkpoint <work>/vae_stage1.pt")
    args = ap.parse_args(argv)
    if args.procs <= 1:
        run(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(args, port), nprocs=args.procs, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
