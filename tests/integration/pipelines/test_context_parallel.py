"""Context parallelism: dit_sparse under diffusers' Ulysses attention, 2 gloo processes on CPU.

One module-scoped run launches this file as a script in 2 processes (``torch.distributed`` gloo, a file store, no
ports to pick); each rank computes the single-process references itself (same seeds) and then the same model
under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))``, and saves everything.
The tests below compare. The tiny Wan transformer has 4 heads (2 per rank) and a (5, 16, 16) grid (1280 tokens,
640 per rank).

diffusers 0.42.1 cannot enable parallelism on a machine without an accelerator: ``_resolve_parallel_config``
computes ``rank % torch.accelerator.device_count()``, which is 0 on CPU (``ZeroDivisionError``). The workers patch
``device_count`` to 1 for that call only (it only names ``ParallelConfig._device``, which CP never reads); the
mesh, the split/gather hooks and the Ulysses all-to-alls are diffusers' own and run on gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, NeighborhoodConfig, SparseAttentionConfig
from dit_sparse.integration.parallel import RING_NOT_SUPPORTED, model_order_index, ulysses_group
from dit_sparse.methods.engine import SparseAttention

WORLD = 2
HEADS = 4
TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 round-off: different summation orders (all-to-all, per-head SDPA calls)


def _draft(**dense):
    return SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16,
                                 backend="torch", dense=DensePolicy(**dense))


CONFIGS = {
    "dense": SparseAttentionConfig(dense=DensePolicy(force_dense=True)),
    "draft": _draft(),
    "dense_heads": _draft(dense_heads=(3,)),  # global head 3 = rank 1's local head 1
    "windows": SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=((1, 1, 1), (3, 1, 1), (1, 3, 3),
                                                                             (3, 3, 1))),
                                     tile=(1, 4, 4), block_size=16, backend="torch"),
}


def wan4(seed: int = 0):
    from diffusers import WanTransformer3DModel
    from tiny import seeded

    return seeded(WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12,
                  in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, seed=seed).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 5, 32, 32, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 10, 32, generator=g), return_dict=False)


# ---------------------------------------------------------------------------------------------- worker (per rank)
def _enable(tr, **cp):
    """``enable_parallelism`` on CPU: diffusers 0.42.1 divides by the accelerator count (0 on CPU) for a device."""
    from unittest import mock

    from diffusers import ContextParallelConfig

    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        tr.enable_parallelism(config=ContextParallelConfig(**cp))
    return tr


@torch.no_grad()
def _worker(rank: int, out_dir: str) -> None:  # noqa: C901 - one script, many scenarios
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    res: dict = {"rank": rank}

    def fwd(tr):
        return tr(**inputs())[0]

    def masks(rt):
        return rt.engine.masks()

    # single-process references (every rank computes the same)
    res["single/stock"] = fwd(wan4())
    for name, cfg in CONFIGS.items():
        tr = wan4()
        (rt,) = dit_sparse.apply(tr, cfg)
        res[f"single/{name}"], res[f"single_masks/{name}"] = fwd(tr), masks(rt)

    # stock diffusers Ulysses: the sequence really is split
    tr = _enable(wan4(), ulysses_degree=WORLD)
    seen = []
    tr.blocks[0].attn1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    res["cp/stock"], res["cp/local_tokens"] = fwd(tr), seen[0]

    # enable_parallelism, then apply (recommended order)
    for name, cfg in CONFIGS.items():
        tr = _enable(wan4(), ulysses_degree=WORLD)
        (rt,) = dit_sparse.apply(tr, cfg)
        res[f"cp/{name}"], res[f"cp_masks/{name}"] = fwd(tr), masks(rt)
        res[f"cp_calls/{name}"], res[f"cp_grid/{name}"] = dict(rt.calls), rt.context.grid

    # apply, then enable_parallelism; remove() gives the stock processors the parallel config
    tr = wan4()
    (rt,) = dit_sparse.apply(tr, CONFIGS["draft"])
    _enable(tr, ulysses_degree=WORLD)
    res["cp_apply_first/draft"], res["cp_apply_first_masks/draft"] = fwd(tr), masks(rt)
    res["cp_apply_first_calls/draft"] = dict(rt.calls)
    dit_sparse.remove(tr)
    res["cp_apply_first/removed"] = fwd(tr)

    # every cp="ulysses" entry of the adapter table (tests/integration/adapters/harness.py): sparse under Ulysses
    # equals sparse in one process, the stock model under Ulysses equals stock (the plan shards this model at all)
    from harness import SPARSE as CASE_SPARSE
    from test_contract import ULYSSES_CASES

    for case in ULYSSES_CASES:
        cp_in = case.cp_inputs or case.inputs
        res[f"case/{case.id}/stock"] = case.forward(case.transformer(), cp_in)
        tr = case.transformer()
        dit_sparse.apply(tr, CASE_SPARSE)
        res[f"case/{case.id}/single"] = case.forward(tr, cp_in)
        tr = _enable(case.transformer(), ulysses_degree=WORLD)
        res[f"case/{case.id}/cp_stock"] = case.forward(tr, cp_in)
        (rt,) = dit_sparse.apply(tr, CASE_SPARSE)
        res[f"case/{case.id}/cp"], res[f"case/{case.id}/calls"] = case.forward(tr, cp_in), dict(rt.calls)

    # LTX, apply first, then enable_parallelism (the table entry above covers the recommended order)
    from test_ltx import ltx_transformer
    from test_ltx import transformer_inputs as ltx_inputs

    tr = ltx_transformer()
    dit_sparse.apply(tr, CASE_SPARSE)
    _enable(tr, ulysses_degree=WORLD)
    res["ltx/cp_apply_first"] = tr(**ltx_inputs(encoder_attention_mask=None))[0]

    # DIT_SPARSE_CHECKS=1: the ranks check that they agree (one all-reduce per call)
    os.environ["DIT_SPARSE_CHECKS"] = "1"
    tr = _enable(wan4(), ulysses_degree=WORLD)
    dit_sparse.apply(tr, CONFIGS["draft"])
    res["cp_checked/draft"] = fwd(tr)
    del os.environ["DIT_SPARSE_CHECKS"]
    from dit_sparse.integration.parallel import check_same_on_all_ranks, ulysses_group

    try:  # ranks that disagree (e.g. on the grid) are caught on every rank
        check_same_on_all_ranks([1, 5, 16, 16 + rank], ulysses_group(tr._parallel_config), "the grid")
        res["check/disagree"] = None
    except RuntimeError as e:
        res["check/disagree"] = str(e)

    # ring attention is refused, at apply() (enable first) or at the first call (apply first)
    tr = _enable(wan4(), ring_degree=WORLD)
    try:
        dit_sparse.apply(tr, CONFIGS["draft"])
        res["ring/apply"] = None
    except NotImplementedError as e:
        res["ring/apply"] = str(e)
    res["ring/apply_left_untouched"] = not dit_sparse.is_applied(tr)
    tr = wan4()
    dit_sparse.apply(tr, CONFIGS["draft"])
    _enable(tr, ring_degree=WORLD)
    try:
        fwd(tr)
        res["ring/forward"] = None
    except NotImplementedError as e:
        res["ring/forward"] = str(e)

    # our all-to-alls: layout of diffusers' helper, round trip, and text reordering on the engine level
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    from dit_sparse.integration.parallel import UlyssesGroup, head_to_seq, seq_to_head, ulysses_attention

    ug = UlyssesGroup(group=dist.group.WORLD, world=WORLD, rank=rank)
    g = torch.Generator().manual_seed(7)
    full = torch.randn(2, 96, HEADS, 8, generator=g)
    local = full.chunk(WORLD, 1)[rank]
    heads = seq_to_head(local, ug)
    res["a2a/expected"] = full[:, :, rank * HEADS // WORLD:(rank + 1) * HEADS // WORLD]
    res["a2a/ours"], res["a2a/diffusers"] = heads, _all_to_all_dim_exchange(local.contiguous(), 2, 1, dist.group.WORLD)
    res["a2a/round_trip"] = torch.equal(head_to_seq(heads, ug), local)

    from dit_sparse import TokenLayout

    for pos in ("before", "after"):
        layout = TokenLayout(frames=2, height=8, width=8, text_tokens=32, text_position=pos, tile=(1, 4, 4),
                             block_size=16)
        q, k, v = (torch.randn(1, 160, HEADS, 8, generator=g) for _ in range(3))
        cfg = _draft(dense_heads=(2,))
        ref = SparseAttention(cfg)(q, k, v, layout=layout, layer=0)
        text, video = (slice(0, 32), slice(32, 160)) if pos == "before" else (slice(128, 160), slice(0, 128))

        def shard(x, text=text, video=video, pos=pos):
            t, vid = x[:, text].chunk(WORLD, 1)[rank], x[:, video].chunk(WORLD, 1)[rank]
            return torch.cat([t, vid] if pos == "before" else [vid, t], 1)

        out = ulysses_attention(SparseAttention(cfg), shard(q), shard(k), shard(v), ug, text_tokens=16,
                                text_position=pos, layout=layout, layer=0)
        res[f"text_{pos}/cp"], res[f"text_{pos}/single"] = out, shard(ref)

    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    here = Path(__file__).resolve()
    tests = here.parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests / "integration" / "adapters"),
                                                        os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", DIT_SPARSE_CHECKS="0")
    procs = [subprocess.Popen([sys.executable, str(here), str(r), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks {failed} failed:\n" + "\n".join(log[-4000:] for log in logs)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return res


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_stock_ulysses_runs_on_gloo(cp_results):
    for res in cp_results:
        assert res["cp/local_tokens"] == 5 * 16 * 16 // WORLD  # the sequence really is sharded
        torch.testing.assert_close(res["cp/stock"], res["single/stock"], **TOL)


def test_dense_config_under_cp_equals_stock(cp_results):
    for res in cp_results:
        torch.testing.assert_close(res["cp/dense"], res["single/stock"], **TOL)
        assert res["cp_calls/dense"] == {"sparse": 0, "dense": 2}


@pytest.mark.parametrize("name", ["draft", "dense_heads", "windows"])
def test_sparse_under_cp_equals_single_process(cp_results, name):
    hl = HEADS // WORLD
    for rank, res in enumerate(cp_results):
        assert res[f"cp_calls/{name}"] == {"sparse": 2, "dense": 0}
        assert res[f"cp_grid/{name}"] == (5, 16, 16)  # the full latent grid on every rank
        # the same plans: this rank's heads of the single-process masks
        for layer, mask in res[f"single_masks/{name}"].items():
            assert torch.equal(res[f"cp_masks/{name}"][layer], mask[:, rank * hl:(rank + 1) * hl])
        torch.testing.assert_close(res[f"cp/{name}"], res[f"single/{name}"], **TOL)
        assert _max_diff(res[f"cp/{name}"], res["single/stock"]) > 1e-3  # really sparse


def test_dense_heads_follow_the_global_head_index(cp_results):
    hl = HEADS // WORLD
    for rank, res in enumerate(cp_results):
        for mask in res["cp_masks/dense_heads"].values():
            full_rows = mask.flatten(2).all(-1)[0].tolist()  # per local head: every block on?
            assert full_rows == [rank * hl + h == 3 for h in range(hl)]


def test_apply_before_enable_parallelism_and_remove(cp_results):
    for rank, res in enumerate(cp_results):
        assert res["cp_apply_first_calls/draft"] == {"sparse": 2, "dense": 0}
        for layer, mask in res["single_masks/draft"].items():
            hl = HEADS // WORLD
            assert torch.equal(res["cp_apply_first_masks/draft"][layer], mask[:, rank * hl:(rank + 1) * hl])
        torch.testing.assert_close(res["cp_apply_first/draft"], res["single/draft"], **TOL)
        torch.testing.assert_close(res["cp_apply_first/removed"], res["single/stock"], **TOL)


def test_ltx_apply_before_enable_parallelism(cp_results):
    for res in cp_results:
        torch.testing.assert_close(res["ltx/cp_apply_first"], res["case/ltx/single"], **TOL)


def _ulysses_ids():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from test_contract import ULYSSES_CASES

    return [c.id for c in ULYSSES_CASES]


@pytest.mark.parametrize("case_id", _ulysses_ids())
def test_adapter_table_entries_under_ulysses(cp_results, case_id):
    """Every ``cp="ulysses"`` entry of the adapter table: the stock model really runs under Ulysses, and the sparse
    config under Ulysses equals the sparse config in one process (and differs from stock)."""
    for res in cp_results:
        k = f"case/{case_id}/"
        torch.testing.assert_close(res[k + "cp_stock"], res[k + "stock"], **TOL)
        torch.testing.assert_close(res[k + "cp"], res[k + "single"], **TOL)
        assert res[k + "calls"]["sparse"] > 0 and res[k + "calls"]["dense"] == 0
        assert _max_diff(res[k + "single"], res[k + "stock"]) > 1e-3


def test_consistency_checks(cp_results):
    for res in cp_results:
        torch.testing.assert_close(res["cp_checked/draft"], res["single/draft"], **TOL)
        assert res["check/disagree"] is not None and "disagree on the grid" in res["check/disagree"]


def test_ring_raises_not_implemented(cp_results):
    for res in cp_results:
        for where in ("ring/apply", "ring/forward"):
            msg = res[where]
            assert msg is not None, f"{where} did not raise"
            assert "Ulysses" in msg and "ring_degree=2" in msg and "full key" in msg
        assert res["ring/apply_left_untouched"]


def test_all_to_all_layout_and_text_order(cp_results):
    for res in cp_results:
        assert torch.equal(res["a2a/ours"], res["a2a/expected"])
        assert torch.equal(res["a2a/ours"], res["a2a/diffusers"])  # same layout as diffusers' helper
        assert res["a2a/round_trip"]
        for pos in ("before", "after"):
            torch.testing.assert_close(res[f"text_{pos}/cp"], res[f"text_{pos}/single"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- single process
def test_ulysses_group_without_cp_and_ring_message():
    from diffusers import ContextParallelConfig

    assert ulysses_group(None) is None
    with pytest.raises(NotImplementedError, match="Ulysses only") as e:
        ulysses_group(ContextParallelConfig(ring_degree=2))
    assert "full key sequence" in str(e.value) and RING_NOT_SUPPORTED.format(ring=2) == str(e.value)
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        ulysses_group(ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))


def test_model_order_index():
    # 2 ranks, each [text 2, video 3] -> model order [t0 t1 t2 t3, v0 ... v5]
    to_model, back = model_order_index(2, 5, 2, "before")
    gathered = torch.tensor([0, 1, 10, 11, 12, 2, 3, 13, 14, 15])
    assert gathered[to_model].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15]
    assert torch.equal(gathered[to_model][back], gathered)
    to_model, _ = model_order_index(2, 5, 2, "after")
    gathered = torch.tensor([10, 11, 12, 0, 1, 13, 14, 15, 2, 3])
    assert gathered[to_model].tolist() == [10, 11, 12, 13, 14, 15, 0, 1, 2, 3]


@torch.no_grad()
@pytest.mark.parametrize("name", ["dense_heads", "windows"])
def test_engine_head_offset_equals_full_call(name):
    from dit_sparse import TokenLayout

    cfg = CONFIGS[name]
    layout = TokenLayout(frames=2, height=8, width=8, tile=(1, 4, 4), block_size=16)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 128, HEADS, 8, generator=g) for _ in range(3))
    full = SparseAttention(cfg)(q, k, v, layout=layout, layer=0)
    for off in (0, 2):
        part = SparseAttention(cfg)(q[:, :, off:off + 2], k[:, :, off:off + 2], v[:, :, off:off + 2], layout=layout,
                                    layer=0, head_offset=off, total_heads=HEADS)
        torch.testing.assert_close(part, full[:, :, off:off + 2], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="head_offset"):
        SparseAttention(cfg)(q[:, :, :2], k[:, :, :2], v[:, :, :2], layout=layout, head_offset=3, total_heads=4)


if __name__ == "__main__":  # a worker rank: python test_context_parallel.py RANK OUT_DIR
    _worker(int(sys.argv[1]), sys.argv[2])
