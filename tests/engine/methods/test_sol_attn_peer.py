"""The Sol-Attn peer comparison (benchmarks/pooled_peers.py): our tiles fed to comfy-kitchen's eager reference.

comfy-kitchen is optional for users (the `[peers]` extra, which CI installs): its tests skip with the reason where it
is missing, and tests/test_peer_claims.py fails in CI if it is.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from benchmarks.pooled_peers import evaluate, sol_attention, sol_density
from dit_sparse import TokenLayout
from tests.utils import structured_family

needs_ck = pytest.mark.skipif(importlib.util.find_spec("comfy_kitchen") is None,
                              reason="comfy-kitchen is not installed (optional peer: pip install comfy-kitchen)")

# partial edge tiles (6 and 7 are not multiples of 4): Sol blocks get block_len < 16
LAYOUT = TokenLayout(frames=2, height=6, width=7, tile=(1, 4, 4))


def _dense(q, k, v, scale):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                            scale=scale).transpose(1, 2)


@needs_ck
def test_tile_mapping_is_exact_when_everything_is_routed():
    """A threshold far below every score routes every block exactly: Sol-Attn on our tiles (zero-padded head dim,
    dead rows, explicit scale) must then be dense attention, and the density probe must read 1."""
    q, k, v = structured_family(LAYOUT, "local", heads=2, dim=24, seed=1, dtype=torch.float32)
    qp, kp, vp = (LAYOUT.permute(t) for t in (q, k, v))
    scale = 0.7 / math.sqrt(24)
    out = LAYOUT.unpermute(sol_attention(qp, kp, vp, LAYOUT, scale=scale, topk_ratio=0.0, tau=-1e6))
    torch.testing.assert_close(out, _dense(q, k, v, scale), atol=2e-5, rtol=2e-5)
    assert sol_density(qp, kp, LAYOUT, scale=scale, topk_ratio=0.0, tau=-1e6) == 1.0
    d = sol_density(qp, kp, LAYOUT, scale=scale, topk_ratio=0.2)
    assert 0 < d < 1


@needs_ck
def test_evaluate_with_sol_reports_every_method():
    q, k, v = structured_family(LAYOUT, "sharp_sparse", heads=2, dim=16, seed=0, dtype=torch.float32)
    row = evaluate(q, k, v, LAYOUT, scale=0.25, topk_ratio=0.25, with_sol=True)
    assert row["density"] <= row["sol_density"] + 1e-9  # never more blocks than the peer
    for m in ("draft", "draft+rect (block)", "draft+row (mean)", "draft+row", "sol-attn"):
        assert math.isfinite(row[m]) and row[m] >= 0


def test_evaluate_without_sol():
    q, k, v = structured_family(LAYOUT, "diffuse", heads=1, dim=16, seed=0, dtype=torch.float32)
    row = evaluate(q, k, v, LAYOUT, scale=0.25, topk_ratio=0.25, with_sol=False)
    assert "sol-attn" not in row and row["draft+row"] < row["draft"]
