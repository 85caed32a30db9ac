"""From how many tokens does a sparse call beat dense SDPA on this device? Measures it and stores it with the package.

For sequence lengths 1k-16k (powers of two, 128-token blocks, density 0.1 per query block, the row mode's pooled
segment of three keys per skipped block, fp32 on CPU), times dense ``F.scaled_dot_product_attention`` and the
``compiled`` backend on the same q/k/v in the same run (median of ``--rep`` calls after a compiling warm-up call).
The break-even is the smallest measured length from which the sparse call is at least 10% faster at every larger
measured length. It is written to ``dit_sparse/backends/break_even.json`` (read by automatic dispatch and by
``DensePolicy(min_tokens="auto")``) and the table to ``benchmarks/results/break-even-<device>.json``.

    python benchmarks/break_even.py                 # CPU, writes both files
    python benchmarks/break_even.py --sizes 512,1024 --no-store   # a quick look (stores nothing in the package)
    python benchmarks/break_even.py --from-json benchmarks/results/break-even-cpu.json   # re-decide, no timing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import bench, environment, print_table, write_json  # noqa: E402
from dit_sparse import SparsePlan, block_sparse_attention  # noqa: E402
from dit_sparse.backends.break_even import BREAK_EVEN_FILE  # noqa: E402
from dit_sparse.segment import PooledSegment  # noqa: E402

SIZES = (1024, 2048, 4096, 8192, 16384)


def sparse_call(seq: int, heads: int, head_dim: int, block: int, density: float, device, dtype, seed: int = 0):
    """q/k/v ``[1, seq, heads, head_dim]``, a plan reading ``max(1, round(density * M))`` key blocks per query block
    (its own block included, the rest random per head), and a pooled segment of three keys per skipped block
    (the row mode's mean plus two outliers) that every query block may read."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seq, heads, head_dim, generator=g).to(device, dtype) for _ in range(3))
    m = -(-seq // block)
    keep = max(1, round(density * m))
    score = torch.rand(1, heads, m, m, generator=g)
    score[..., torch.arange(m), torch.arange(m)] = 2.0
    mask = torch.zeros(1, heads, m, m, dtype=torch.bool).scatter_(-1, score.topk(keep, dim=-1).indices, True)
    plan = SparsePlan.from_dense(mask.to(device), block_q=block, block_k=block, seq_q=seq, seq_k=seq)
    nk = max(1, 3 * (m - keep))
    seg = PooledSegment(keys=torch.randn(1, heads, nk, head_dim, generator=g).to(device),
                        values=torch.randn(1, heads, nk, head_dim, generator=g).to(device),
                        log_count=torch.full((nk,), float(torch.log(torch.tensor(block / 3.0)))).to(device),
                        read=torch.ones(1, heads, m, nk, dtype=torch.bool).to(device))
    return q, k, v, plan, seg, keep, m


def measure(sizes, heads: int, head_dim: int, block: int, density: float, device, dtype, rep: int) -> list[dict]:
    rows = []
    for seq in sizes:
        q, k, v, plan, seg, keep, m = sparse_call(seq, heads, head_dim, block, density, device, dtype)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        dense_ms = bench(lambda a=(qt, kt, vt): F.scaled_dot_product_attention(*a), warmup=1, rep=rep)
        sparse_ms = bench(lambda a=(q, k, v, plan), s=seg: block_sparse_attention(*a, backend="compiled", pooled=s),
                          warmup=1, rep=rep)
        rows.append(dict(tokens=seq, heads=heads, head_dim=head_dim, block=block, blocks_read=keep, blocks=m,
                         density=round(keep / m, 4), segment_keys=seg.num_keys, dense_sdpa_ms=dense_ms,
                         compiled_ms=sparse_ms, speedup_vs_dense=dense_ms / sparse_ms))
        print(f"  {seq:>6} tokens: dense {dense_ms:9.1f} ms  compiled sparse {sparse_ms:9.1f} ms  "
              f"({dense_ms / sparse_ms:.2f}x)", flush=True)
    return rows


#: the sparse call must be this much faster than dense to count as a win (a 3% lead is within the noise of a
#: shared CPU, and a sparse call also pays its plan)
MARGIN = 1.1


def break_even(rows: list[dict]) -> int | None:
    """Smallest measured length from which the sparse call wins by :data:`MARGIN` at every larger measured length
    (None: never)."""
    best = None
    for r in sorted(rows, key=lambda r: -r["tokens"]):
        if r["speedup_vs_dense"] < MARGIN:
            break
        best = r["tokens"]
    return best


def store(device_type: str, tokens: int | None, payload: dict, path: Path = BREAK_EVEN_FILE) -> None:
    """Write this device's record into the package's break-even file (other devices' records are kept)."""
    data = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    if tokens is None:
        data["devices"].pop(device_type, None)
    else:
        data["devices"][device_type] = {"tokens": tokens, "density": payload["density"], "block": payload["block"],
                                        "dtype": payload["dtype"], "torch": payload["environment"]["torch"],
                                        "measured_by": "benchmarks/break_even.py",
                                        "table": "benchmarks/results/break-even-cpu.json"}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="folder for the results JSON (default benchmarks/results)")
    ap.add_argument("--no-store", action="store_true", help="do not write dit_sparse/backends/break_even.json")
    ap.add_argument("--from-json", type=Path, default=None, help="recompute the break-even (and store it) from a "
                    "break-even results file instead of measuring")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"break-even on {device} ({torch.get_num_threads()} threads), density {args.density}, "
          f"{args.block}-token blocks, pooled segment on:", flush=True)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        rows = payload["rows"]
    else:
        with torch.no_grad():
            rows = measure(sizes, args.heads, args.head_dim, args.block, args.density, device, dtype, args.rep)
        payload = dict(environment=environment(), device=device.type, threads=torch.get_num_threads(),
                       dtype=str(dtype).removeprefix("torch."), density=args.density, block=args.block, rows=rows)
    tokens = break_even(rows)
    payload.update(break_even_tokens=tokens, margin=MARGIN)
    path = write_json("break-even", payload, args.out)
    print_table(rows, ["tokens", "blocks_read", "blocks", "segment_keys", "dense_sdpa_ms", "compiled_ms",
                       "speedup_vs_dense"])
    print(f"break-even: {tokens if tokens is not None else 'none in the measured range'} tokens; table {path}")
    if not args.no_store:
        store(device.type, tokens, payload)
        print(f"stored in {BREAK_EVEN_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
