"""End-to-end denoising-step speed: full-size transformer architectures (random weights), dense vs presets.

Speed does not depend on weight values, so the real architectures are built from their configs with random
weights. For each model it times one transformer forward (one denoising call) dense and under each preset
(warm-up switched off, so the sparse step itself is timed; dense *layers* stay dense), measures the attention
share of a dense step (the step timed with every SDPA call returning its query, subtracted), and reports:

* ``step_speedup``: dense step / sparse step, the dense step as diffusers runs it (its masks and SDPA choice:
  HunyuanVideo passes a key-padding mask, which keeps cuDNN and flash out);
* ``step_speedup_vs_unmasked``: the same against the second denominator, a dense step whose every SDPA call drops
  its mask (the inputs' masks are all-True, so the math is the same) and runs the fastest unmasked SDPA backend
  at the model's shape (cuDNN, flash or efficient, timed first: ``best_unmasked_backend``);
* ``run_speedup``: a 50-step run with the preset's dense warm-up steps, ``50 T_d / (w T_d + (50 - w) T_s)``;
* ``amdahl_limit``: ``1 / (w + (1 - w) ((1 - a) + a d))`` with attention share ``a``, achieved density ``d`` and
  warm-up fraction ``w`` — and how close each result comes to it.

Targets on H100 at 90% sparsity: HunyuanVideo 720p >= 3.5x with no dense warm-up, >= 2.3x with 20% warm-up;
Wan2.1-1.3B 480p >= 2.0x with no warm-up.

    python benchmarks/end_to_end.py                       # needs a CUDA GPU
    python benchmarks/end_to_end.py --models hunyuan-720p --layers 8   # fewer layers if memory demands
    python benchmarks/end_to_end.py --out results_dir     # JSON into that folder
    python benchmarks/end_to_end.py --smoke               # CPU dry run on tiny configs
    python benchmarks/end_to_end.py --device cpu --blocks 1 [--backend compiled]   # CPU, Wan2.1-1.3B 480p

``--device cpu``: Wan2.1-1.3B from its real config (random weights, fp32) cut to ``--blocks`` transformer blocks
(``num_layers`` override; the real model has 30), at the real 480p token count (latent 21x60x104 -> 21x30x52 =
32,760 patch tokens; ``--frames`` cuts the latent frames for a quicker check), one timed step each (``--rep``,
default 1; one untimed warm-up call first, where the compiled backend (named or automatic) compiles), stock vs
every Wan2.1-1.3B preset of ``dit_sparse.list_presets()`` (``--presets`` to pick some). With only a few blocks a
preset's dense layers (block 0, or 0-1) would be every block, so the CPU mode runs every block sparse and says so
(``dense_layers_dropped``): the step speedup, attention share and Amdahl limit are those of the sparse blocks.
``--backend``: the op backend (default: automatic dispatch); one that is not registered is refused with the list.
Writes ``end_to_end-cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dit_sparse  # noqa: E402
from benchmarks._common import bench, environment, print_table, write_json  # noqa: E402
from dit_sparse import DensePolicy  # noqa: E402

RUN_STEPS = 50


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    cls: str
    config: dict
    latent: tuple  # (C, F, H, W) latent shape (before patching)
    text: tuple  # (tokens, dim) of encoder_hidden_states
    presets: tuple
    heads: int
    head_dim: int
    attn_layers: int  # self-attention calls per forward
    text_in_self_attn: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


MODELS = {
    "wan2.1-1.3b-480p": Model(
        "wan2.1-1.3b-480p", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        (16, 21, 60, 104), (512, 4096),
        ("wan2.1-t2v-1.3b:draft-80", "wan2.1-t2v-1.3b:rectified-80", "wan2.1-t2v-1.3b:draft-90-rect"),
        heads=12, head_dim=128, attn_layers=30),
    "hunyuan-720p": Model(
        "hunyuan-720p", "HunyuanVideoTransformer3DModel",
        dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
             num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
             qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
             rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
        (16, 33, 90, 160), (256, 4096),
        ("hunyuanvideo:rectified-90", "hunyuanvideo:rectified-90-warmup", "hunyuanvideo:draft-90",
         "hunyuanvideo:neighborhood"),
        heads=24, head_dim=128, attn_layers=60, text_in_self_attn=256,
        extra={"pooled": 768, "guidance": True}),
}

SMOKE = {
    "wan-smoke": Model(
        "wan-smoke", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
        (4, 4, 32, 32), (8, 32), ("wan2.1-t2v-1.3b:draft-80",), heads=2, head_dim=16, attn_layers=2),
}


def build(model: Model, layers: int | None, device, dtype):
    import diffusers

    cfg = dict(model.config)
    if layers is not None:
        for key in ("num_layers", "num_single_layers"):
            if key in cfg:
                cfg[key] = min(cfg[key], layers)
    with torch.device(device):
        tr = getattr(diffusers, model.cls)(**cfg).to(dtype).eval()
    return tr, cfg


def inputs(model: Model, device, dtype, seed=0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    c, f, h, w = model.latent
    kw = dict(hidden_states=torch.randn(1, c, f, h, w, generator=g, device=device, dtype=dtype),
              timestep=torch.tensor([900.0], device=device),
              encoder_hidden_states=torch.randn(1, *model.text, generator=g, device=device, dtype=dtype),
              return_dict=False)
    if "pooled" in model.extra:
        kw["pooled_projections"] = torch.randn(1, model.extra["pooled"], generator=g, device=device, dtype=dtype)
        kw["encoder_attention_mask"] = torch.ones(1, model.text[0], device=device, dtype=torch.bool)
    if model.extra.get("guidance"):
        kw["guidance"] = torch.tensor([6000.0], device=device)
    return kw


def grid(model: Model, cfg: dict) -> tuple[int, int, int]:
    """Latent token grid (frames, height, width) after patching."""
    _, f, h, w = model.latent
    p = cfg["patch_size"]
    pt, ph, pw = p if isinstance(p, tuple) else (cfg.get("patch_size_t") or 1, p, p)
    return (f // pt, h // ph, w // pw)


def tokens(model: Model, cfg: dict) -> int:
    f, h, w = grid(model, cfg)
    return f * h * w


def attention_op_ms(model: Model, n_video: int, device, dtype) -> float:
    """One unmasked self-attention op at the model's shape, SDPA's own backend choice (for reference)."""
    s = n_video + model.text_in_self_attn
    q, k, v = (torch.randn(1, model.heads, s, model.head_dim, device=device, dtype=dtype) for _ in range(3))
    return bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=5)


@contextlib.contextmanager
def attention_removed():
    """Every SDPA call returns its query: a dense step without attention, so ``dense - this`` is the attention
    time *as diffusers runs it* (with its masks and backend choice), not an idealised op time."""
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, *args, **kwargs: query
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


_UNMASKED = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def best_unmasked_backend(model: Model, n_video: int, device, dtype) -> tuple[str | None, dict]:
    """The fastest unmasked SDPA backend at the model's self-attention shape -> (name, {name: ms or None})."""
    if torch.device(device).type != "cuda":
        return None, {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = n_video + model.text_in_self_attn
    q, k, v = (torch.randn(1, model.heads, s, model.head_dim, device=device, dtype=dtype) for _ in range(3))
    times = {}
    for name, kind in _UNMASKED.items():
        try:
            with sdpa_kernel([getattr(SDPBackend, kind)]):
                F.scaled_dot_product_attention(q, k, v)
                times[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=5)
        except RuntimeError:
            times[name] = None
    ok = {n: t for n, t in times.items() if t is not None}
    return (min(ok, key=ok.get) if ok else None), times


@contextlib.contextmanager
def attention_unmasked(backend: str):
    """Every SDPA call drops ``attn_mask`` and runs on ``backend`` (the benchmark's masks are all-True)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = F.scaled_dot_product_attention
    kind = getattr(SDPBackend, _UNMASKED[backend])

    def unmasked(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        with sdpa_kernel([kind]):
            return real(query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = unmasked
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def no_warmup(config, keep_dense_layers: bool = True):
    """The preset's config with every step sparse (its warm-up enters ``run_speedup`` only) and ``min_tokens=0``
    (the step is timed sparse; at the real shapes the presets' ``"auto"`` floor is far below the tokens anyway)."""
    d = config.dense
    return dataclasses.replace(config, dense=DensePolicy(
        dense_layers=d.dense_layers if keep_dense_layers else frozenset(), dense_heads=d.dense_heads, min_tokens=0))


def cpu_model(frames: int | None = None) -> Model:
    """Wan2.1-1.3B 480p with every Wan2.1-1.3B preset of ``list_presets()`` (``frames``: latent frames, default 21)."""
    base = MODELS["wan2.1-1.3b-480p"]
    names = tuple(p.name for p in dit_sparse.list_presets() if p.name.startswith("wan2.1-t2v-1.3b:"))
    latent = base.latent if frames is None else (base.latent[0], frames, *base.latent[2:])
    return dataclasses.replace(base, latent=latent, presets=names)


def run_model(model: Model, layers, device, dtype, rep, *, warmup: int | None = None, backend: str | None = None,
              keep_dense_layers: bool = True) -> list[dict]:
    """``warmup``: untimed calls before each timing (default: ``bench``'s); ``backend``: the op backend of the sparse
    steps (None: automatic dispatch); ``keep_dense_layers=False`` runs every layer sparse (few-block CPU runs)."""
    timing = {} if warmup is None else {"warmup": warmup}
    sparse_timing = dict(timing)
    if backend != "torch" and warmup is not None:
        # the first sparse call compiles (the compiled backend, named or picked by automatic dispatch on CPU): a
        # run pays it once per shape signature (``compile_s`` in the JSON), not every step
        sparse_timing["warmup"] = max(1, warmup)
    tr, cfg = build(model, layers, device, dtype)
    kw = inputs(model, device, dtype)
    n_attn = model.attn_layers if layers is None else sum(min(cfg.get(k, 0), layers)
                                                          for k in ("num_layers", "num_single_layers"))
    n_video = tokens(model, cfg)
    dense_ms = bench(lambda: tr(**kw), rep=rep, **timing)
    with attention_removed():
        no_attn_ms = bench(lambda: tr(**kw), rep=rep, **timing)
    attn_ms = max(dense_ms - no_attn_ms, 0.0)
    share = attn_ms / dense_ms
    # the op alone (for reference; on CPU it would cost one more dense attention layer: not timed)
    op_ms = attention_op_ms(model, n_video, device, dtype) if torch.device(device).type == "cuda" else None
    best, backend_ms = best_unmasked_backend(model, n_video, device, dtype)
    unmasked_ms = None
    if best is not None:
        with attention_unmasked(best):
            unmasked_ms = bench(lambda: tr(**kw), rep=rep)
        print(f"  dense step with every SDPA call unmasked on {best}: {unmasked_ms:.1f} ms (op times {backend_ms})")
    print(f"\n{model.name}: {n_video} video tokens, {n_attn} attention layers; dense step {dense_ms:.1f} ms, "
          f"without attention {no_attn_ms:.1f} ms -> attention {attn_ms:.1f} ms = {share:.1%} of the step "
          f"({attn_ms / n_attn:.1f} ms per layer as diffusers runs it"
          + ("" if op_ms is None else f"; unmasked SDPA op {op_ms:.1f} ms") + ")", flush=True)
    rows = []
    for name in model.presets:
        preset = dit_sparse.get_preset(name)
        (rt,) = dit_sparse.apply(tr, no_warmup(preset.config, keep_dense_layers))
        with dit_sparse.use_backend(backend):
            sparse_ms = bench(lambda: tr(**kw), rep=rep, **sparse_timing)
        density = rt.density
        dit_sparse.remove(tr)
        warm = preset.config.dense.warmup_steps(RUN_STEPS)
        w = warm / RUN_STEPS
        run_speedup = RUN_STEPS * dense_ms / (warm * dense_ms + (RUN_STEPS - warm) * sparse_ms)
        d = density if density is not None else 1.0
        limit = 1.0 / (w + (1 - w) * ((1 - share) + share * d))
        step_limit = 1.0 / ((1 - share) + share * d)  # one sparse step (no warm-up)
        layout = preset.config.layout(*grid(model, cfg), text_tokens=model.text_in_self_attn)
        rows.append({"model": model.name, "preset": name, "video_tokens": n_video, "layers": n_attn,
                     "tokens": layout.seq_len, "padded_tokens": layout.padded_len, "tile": layout.tile,
                     "packing": layout.packing,
                     "grid": list(grid(model, cfg)), "heads": model.heads, "head_dim": model.head_dim,
                     "dtype": str(dtype).replace("torch.", ""), "backend": backend or "auto",
                     "dense_layers_dropped": (sorted(preset.config.dense.dense_layers)
                                              if not keep_dense_layers else []),
                     "dense_step_ms": dense_ms, "no_attention_step_ms": no_attn_ms,
                     "attention_layer_ms": attn_ms / n_attn, "unmasked_sdpa_op_ms": op_ms,
                     "sparse_step_ms": sparse_ms, "attention_share": share,
                     "density": d, "warmup_steps": warm, "step_speedup": dense_ms / sparse_ms,
                     "best_unmasked_backend": best, "unmasked_sdpa_backend_ms": backend_ms,
                     "dense_unmasked_step_ms": unmasked_ms,
                     "step_speedup_vs_unmasked": None if unmasked_ms is None else unmasked_ms / sparse_ms,
                     "run_speedup": run_speedup, "amdahl_limit": limit, "of_limit": run_speedup / limit,
                     "step_amdahl_limit": step_limit, "step_of_limit": dense_ms / sparse_ms / step_limit})
        vs_unmasked = "" if unmasked_ms is None else f" (x{unmasked_ms / sparse_ms:.2f} vs unmasked {best})"
        print(f"  {name}: sparse step {sparse_ms:.1f} ms, density {d:.3f}, step x{dense_ms / sparse_ms:.2f}"
              f"{vs_unmasked} (step limit x{step_limit:.2f}, {dense_ms / sparse_ms / step_limit:.0%} of it), "
              f"50-step run x{run_speedup:.2f} (Amdahl limit x{limit:.2f}, {run_speedup / limit:.0%} of it)",
              flush=True)
    share_limit = 1 / ((1 - share) + share * 0.1)
    print(f"  Amdahl: with attention share {share:.2f}, 90% sparsity cannot exceed x{share_limit:.2f} without "
          f"warm-up, or x{1 / (0.2 + 0.8 / share_limit):.2f} with 20% dense steps.")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", "--blocks", dest="layers", type=int, default=None,
                    help="cap layers (transformer blocks) per stack (memory, CPU time); attention share and speedups "
                         "are per-layer ratios, so they carry over")
    ap.add_argument("--device", default=None, choices=("cpu",), help="cpu: the CPU mode (Wan2.1-1.3B 480p, fp32)")
    ap.add_argument("--backend", default=None, help="op backend of the sparse steps (default: automatic dispatch)")
    ap.add_argument("--presets", default=None, help="CPU mode: comma-separated preset names (default: every "
                                                    "Wan2.1-1.3B preset)")
    ap.add_argument("--frames", type=int, default=None, help="CPU mode: latent frames (default 21, the real 81-frame "
                                                             "video; fewer for a quicker check)")
    ap.add_argument("--rep", type=int, default=None, help="timed steps per measurement (CPU default 1)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny configs (no numbers worth reporting)")
    args = ap.parse_args(argv)
    if args.backend is not None:
        from dit_sparse.backends import BACKENDS

        if args.backend not in BACKENDS:
            print(f"benchmarks/end_to_end.py: --backend {args.backend!r} is not registered; registered: "
                  f"{sorted(BACKENDS)} (or leave --backend out for automatic dispatch).", file=sys.stderr)
            return 2
    extra = {"backend": args.backend}
    if args.device == "cpu" and not args.smoke:
        model = cpu_model(args.frames)
        if args.presets:
            unknown = sorted(set(args.presets.split(",")) - set(model.presets))
            if unknown:
                print(f"benchmarks/end_to_end.py: --presets {unknown} are not Wan2.1-1.3B presets; expected some of "
                      f"{list(model.presets)}.", file=sys.stderr)
                return 2
            model = dataclasses.replace(model, presets=tuple(args.presets.split(",")))
        layers = 1 if args.layers is None else args.layers
        models, device, dtype, rep = [model], "cpu", torch.float32, args.rep or 1
        extra.update(warmup=0, keep_dense_layers=False)
        args.layers = layers
    elif args.smoke:
        models, device, dtype, rep = list(SMOKE.values()), "cpu", torch.float32, 2
    else:
        if not torch.cuda.is_available():
            print("benchmarks/end_to_end.py needs a CUDA GPU; pass --device cpu for the CPU mode or --smoke for a CPU "
                  "dry run of the script.", file=sys.stderr)
            return 2
        models, device, dtype, rep = [MODELS[m] for m in args.models.split(",")], "cuda", torch.bfloat16, 5
    rows = []
    with torch.no_grad():
        for m in models:
            rows += run_model(m, args.layers, device, dtype, rep, **extra)
    print()
    print_table(rows, ["model", "preset", "attention_share", "density", "step_speedup", "step_amdahl_limit",
                       "step_of_limit", "step_speedup_vs_unmasked", "warmup_steps",
                       "run_speedup", "amdahl_limit", "of_limit"])
    if not args.smoke or args.out is not None:  # smoke runs write only where asked (the suite's dry run)
        from dit_sparse.backends.compiled import compile_times

        payload = {"environment": environment(), "layers": args.layers, "rows": rows, "compile_s": compile_times(),
                   "command": "python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        if args.device == "cpu" and not args.smoke:
            payload["note"] = (f"CPU mode: Wan2.1-1.3B's real config cut to {args.layers} of its 30 blocks "
                               f"(num_layers override), random weights, fp32, {rep} timed step(s) each; every block "
                               "runs sparse (the presets' dense layers dropped, see dense_layers_dropped); no dense "
                               "warm-up in the timed step (warmup_steps enter run_speedup only)")
        print(f"\nwrote {write_json('end_to_end', payload, folder=args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
