"""The Gradio UI: prompt, preset or custom methods, sparsity, seed, steps -> dense and sparse renders side by side,
timings and fidelity, and pictures of the sparse plan (block mask of one layer and head, density per layer).

Only UI code lives here; rendering is ``dit_sparse.tools.render.Renderer`` on the embedded tiny model. Inputs (prompt,
preset, seed, steps, layer and head of the plan picture) are checked before anything renders.
"""

from __future__ import annotations

import io
import tempfile
import threading
from pathlib import Path

import numpy as np

import dit_sparse
from dit_sparse.tools.render import Job, Renderer, save_media

CUSTOM = "custom (methods below)"
METHODS = ["draft", "rectification", "neighborhood", "temporal reuse"]

_renderer: Renderer | None = None
_lock = threading.Lock()


def renderer() -> Renderer:
    global _renderer
    with _lock:
        if _renderer is None:
            # the demo shows the methods side by side with stock attention, so it runs them sparse even below
            # the CPU's break-even (where the presets' DensePolicy(min_tokens="auto") would run dense)
            _renderer = Renderer("embedded", progress=False, min_tokens=0)
    return _renderer


def preset_choices() -> list[str]:
    from dit_sparse.integration.pipelines.presets import TINY_PRESET_PREFIX

    return [p.name for p in dit_sparse.list_presets() if p.name.startswith(TINY_PRESET_PREFIX)] + [CUSTOM]


def custom_config(methods: list[str], sparsity: float):
    """A SparseAttentionConfig from the method toggles (block size of the embedded model's default preset)."""
    from dit_sparse import (
        DraftAttentionConfig,
        NeighborhoodConfig,
        PooledRectificationConfig,
        SparseAttentionConfig,
        TemporalReuseConfig,
    )
    from dit_sparse.integration.pipelines.presets import TINY_DEFAULT_PRESET as DEFAULT_PRESET

    if not methods:
        raise ValueError("Pick at least one method, or a preset.")
    base = dit_sparse.get_preset(DEFAULT_PRESET).config
    rect = "rectification" in methods
    return SparseAttentionConfig(
        draft=DraftAttentionConfig(sparsity=sparsity) if "draft" in methods else None,
        neighborhood=NeighborhoodConfig(window=(1, 3, 3)) if "neighborhood" in methods else None,
        rectification=PooledRectificationConfig(sparsity=sparsity) if rect else None,
        reuse=TemporalReuseConfig(refresh_period=3, retention=not rect) if "temporal reuse" in methods else None,
        dense=base.dense, tile=base.tile, block_size=base.block_size)


def plan_picture(masks: dict, layer: int, head: int):
    """Heat map of one layer's block mask (rows: query blocks, columns: key blocks) as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not masks:
        raise ValueError("This run recorded no sparse plan (every call was dense: warm-up steps or dense layers).")
    if layer not in masks:
        raise ValueError(f"Layer {layer} ran dense in this run (no sparse plan); pick one of {sorted(masks)}.")
    m = masks[layer][0]
    if not 0 <= head < m.shape[0]:
        raise ValueError(f"Head {head} does not exist; pick 0 .. {m.shape[0] - 1}.")
    m = m[head].float().numpy()
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"layer {layer}, head {head}: {m.mean():.0%} of blocks read")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    fig.tight_layout()
    return _to_array(fig)


def density_picture(layer_density: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(k for k in layer_density if isinstance(k, int))
    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    ax.bar([str(k) for k in layers], [layer_density[k] for k in layers], color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of blocks read")
    ax.set_title("density per layer (1.0 = dense)")
    fig.tight_layout()
    return _to_array(fig)


def _to_array(fig):
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _whole(value, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``, else a message that says the range (checked before rendering)."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number between {lo} and {hi}, got {value!r}.") from None
    if not as_float.is_integer() or not lo <= as_float <= hi:
        raise ValueError(f"{what} must be a whole number between {lo} and {hi}, got {value!r}.")
    return value if isinstance(value, int) and not isinstance(value, bool) else int(as_float)


def check_inputs(prompt, preset, seed, steps, layer, head) -> tuple[int, int, int, int]:
    """Every input checked before anything renders: ``(seed, steps, layer, head)``."""
    from dit_sparse.tiny.model import TRANSFORMER_CONFIG
    from dit_sparse.tools.jobs import SEED_MAX

    if not prompt or not str(prompt).strip():
        raise ValueError("Type a prompt, e.g. 'a red circle moving right'.")
    if preset not in preset_choices():
        raise ValueError(f"Unknown preset {preset!r}; pick one from the list.")
    seed = _whole(seed, "Seed", 0, SEED_MAX)
    steps = _whole(steps, "Steps", 1, 50)
    layer = _whole(layer, "Plan: layer", 0, TRANSFORMER_CONFIG["num_layers"] - 1)
    head = _whole(head, "Plan: head", 0, TRANSFORMER_CONFIG["num_attention_heads"] - 1)
    return seed, steps, layer, head


def run(prompt: str, preset: str, methods: list[str], sparsity: float, seed: int, steps: int, layer: int,
        head: int):
    """Dense and sparse renders plus the report; every problem becomes a readable message."""
    import gradio as gr

    from dit_sparse.tools.metrics import compare_frames
    from dit_sparse.tools.words import speed_words

    try:
        seed, steps, layer, head = check_inputs(prompt, preset, seed, steps, layer, head)
        config = custom_config(methods, float(sparsity)) if preset == CUSTOM else preset
        cfg = config if preset == CUSTOM else dit_sparse.get_preset(preset).config
        if layer in cfg.dense.dense_layers:
            raise ValueError(f"Layer {layer} always runs dense under {preset}; pick another layer.")
        r = renderer()
        job = Job(prompt=prompt.strip(), seed=seed, steps=steps)
        with _lock:
            dense, t_dense, _, _ = r.generate(job, None)
            sparse, t_sparse, stats, _ = r.generate(job, config, record_masks=True)
        out = Path(tempfile.mkdtemp(prefix="dit_sparse_demo_"))
        paths = []
        for name, frames in (("dense", dense), ("sparse", sparse)):
            path = out / f"{name}{r.suffix}"
            save_media(frames, path)
            paths.append(str(path))
        m = compare_frames(sparse, dense)
        report = (f"**dense** {t_dense:.2f} s · **sparse** {t_sparse:.2f} s · **sparse is "
                  f"{speed_words(t_dense / t_sparse)}** (speedup {t_dense / t_sparse:.2f}; CPU, tiny model: "
                  f"attention is a small share here)  \n"
                  f"measured density **{stats['density']:.2f}** · PSNR **{m['psnr']:.2f} dB** · "
                  f"SSIM **{m['ssim']:.4f}** · attention calls {stats['attention_calls']}")
        return (paths[0], paths[1], report, plan_picture(stats.get("masks", {}), layer, head),
                density_picture(stats["layer_density"]))
    except (ValueError, NotImplementedError) as e:
        raise gr.Error(str(e)) from None
    except Exception as e:  # never a stack trace in the UI
        raise gr.Error(f"Rendering failed: {type(e).__name__}: {e}") from None


def build_demo():
    import gradio as gr

    from dit_sparse.integration.pipelines.presets import TINY_DEFAULT_PRESET as DEFAULT_PRESET
    from dit_sparse.tiny.model import DEFAULT_PROMPTS

    with gr.Blocks(title="dit_sparse demo") as demo:
        gr.Markdown("# dit_sparse — sparse attention for diffusion transformers\n"
                    "The embedded tiny text-to-video model, rendered twice with the same seed: stock (dense) "
                    "attention and dit_sparse. The plan pictures show which key blocks each query block read.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Dropdown(choices=DEFAULT_PROMPTS, value=DEFAULT_PROMPTS[0], allow_custom_value=True,
                                     label="Prompt")
                preset = gr.Dropdown(choices=preset_choices(), value=DEFAULT_PRESET, label="Preset")
                methods = gr.CheckboxGroup(METHODS, value=["draft", "rectification"],
                                           label="Methods (custom preset)")
                sparsity = gr.Slider(0.3, 0.95, value=0.75, step=0.05, label="Sparsity (custom preset)")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    steps = gr.Slider(2, 30, value=10, step=1, label="Steps")
                with gr.Row():
                    layer = gr.Number(value=1, precision=0, label="Plan: layer")
                    head = gr.Number(value=0, precision=0, label="Plan: head")
                go = gr.Button("Render dense and sparse", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_out = gr.Video(label="dense (stock attention)")
                    sparse_out = gr.Video(label="dit_sparse")
                report = gr.Markdown()
                with gr.Row():
                    plan_img = gr.Image(label="sparse plan (block mask)", type="numpy")
                    dens_img = gr.Image(label="density per layer", type="numpy")
        go.click(run, [prompt, preset, methods, sparsity, seed, steps, layer, head],
                 [dense_out, sparse_out, report, plan_img, dens_img], api_name="render")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, block: bool = False):
    demo = build_demo()
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, show_error=False)
    return demo
