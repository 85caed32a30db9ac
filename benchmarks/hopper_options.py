"""The Hopper kernel's switches, each flipped against the default and timed (``HopperOptions``).

The ``hopper`` backend at HunyuanVideo 720p (packed layout, bf16, head_dim 128), density 0.1, under each variant:

* ``default``          — ``HopperOptions()``: full/partial split, conditional rescaling (threshold 8), TMA where
  the inputs qualify, warp specialisation off;
* ``warp_specialize``  — ``warp_specialize=True`` (``tl.range(..., warp_specialize=True)``; needs Triton >= 3.4,
  else the row says why);
* ``masked_loops``     — ``split_full=False`` (every key block masked);
* ``rescale_always``   — ``rescale_threshold=0`` (FlashAttention-2's rescale at every step);
* ``pointer_loads``    — ``tma=False``.

Each variant is first checked against the fp32 reference on a few query blocks (``attention.our_backends``) and
timed only within ``2e-2`` relative error; ``vs_default`` is the default's time over the variant's (> 1: the
switch helps). With ``DIT_SPARSE_AUTOTUNE=quick`` (as the GPU suite runs it) every variant runs the same single
tile config, so the rows compare the switches alone. JSON: ``hopper_options-<gpu>.json`` (``--out DIR``; default
benchmarks/results), written after every variant.

    python benchmarks/hopper_options.py --out DIR      # needs a CUDA GPU of compute capability 9.0+
    python benchmarks/hopper_options.py --smoke        # CPU: the Triton interpreter on a tiny shape, no numbers
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: the variants: name -> HopperOptions fields changed from the default
VARIANTS = {
    "default": {},
    "warp_specialize": {"warp_specialize": True},
    "masked_loops": {"split_full": False},
    "rescale_always": {"rescale_threshold": 0.0},
    "pointer_loads": {"tma": False},
}
DENSITY = 0.1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU: the Triton interpreter on a tiny shape")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import attention as att
    from benchmarks._common import SHAPES, Shape, environment, print_table, write_json
    from dit_sparse import TokenLayout
    from dit_sparse.backends import BACKENDS, AttentionInputs
    from dit_sparse.kernels.block_sparse_attn_hopper import HopperOptions

    if args.smoke:
        shape, device, dtype, tol = Shape("smoke", 1, 8, 8, 1, text=16, head_dim=32), torch.device("cpu"), \
            torch.float32, 1e-3
        att._SMOKE = True
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            print("benchmarks/hopper_options.py needs a CUDA GPU of compute capability 9.0+ (the Hopper kernel); "
                  "pass --smoke for a CPU dry run in the Triton interpreter.", file=sys.stderr)
            return 2
        shape, device, dtype, tol = SHAPES["hunyuan-720p"], torch.device("cuda"), torch.bfloat16, 2e-2
    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text,
                         packing="packed")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, shape.tokens, shape.heads, shape.head_dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    plan = att.random_plan(layout, shape.heads, DENSITY, device)
    ref = att.RowReference(qp, kp, vp, layout, plan)
    backend = BACKENDS["hopper"]
    inputs = AttentionInputs(qp, kp, vp, plan, shape.head_dim ** -0.5, False)
    saved = backend.options
    path = None
    rows: list[dict] = []
    base_ms = None
    try:
        with torch.no_grad():
            for name, fields in VARIANTS.items():
                backend.options = HopperOptions(**fields)
                res = att.our_backends(qp, kp, vp, plan, ref, tol, rep=1 if args.smoke else 10, names=["hopper"],
                                       auto=False)["hopper"]
                base_ms = res["ms"] if name == "default" else base_ms
                rows.append({"shape": shape.name, "tokens": shape.tokens, "padded_tokens": layout.seq_len,
                             "density": round(plan.density, 4), "variant": name, "options": repr(backend.options),
                             "path": backend.describe(inputs), "status": res["status"], "ms": res["ms"],
                             "rel_err": res["rel_err"],
                             "vs_default": (base_ms / res["ms"]) if base_ms and res["ms"] else None})
                timed = res["status"] if res["ms"] is None else f"{res['ms']:.3f} ms"
                print(f"{name:<16} {timed}", flush=True)
                path = write_json("hopper_options", {"environment": environment(), "dtype": str(dtype),
                                                     "autotune": os.environ.get("DIT_SPARSE_AUTOTUNE", "full"),
                                                     "rows": rows}, folder=args.out) \
                    if (args.out is not None or not args.smoke) else None
    finally:
        backend.options = saved
    print()
    print_table(rows, ["variant", "status", "ms", "vs_default", "rel_err"])
    if path is not None:
        print(f"\nwrote {path}")
    wrong = [r["variant"] for r in rows if r["status"].startswith("WRONG")]
    if wrong:
        print(f"WRONG results (rel err above {tol:g} vs the fp32 reference): {wrong}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
