"""The pipeline loader: ``load_pipeline`` = diffusers ``from_pretrained`` + ``dit_sparse.apply`` with a preset.

    pipe = dit_sparse.load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", preset="wan2.1-t2v-1.3b:draft-80",
                                    torch_dtype=torch.bfloat16, device="cuda")

Works on hub ids and on local folders (what the tests use: tiny pipelines saved with ``save_pretrained``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .presets import Preset

__all__ = ["load_pipeline", "looks_like_hub_id"]


def load_pipeline(model_id_or_path: str | None = None, preset: str | Preset | None = None, *,
                  torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  **from_pretrained_kwargs):
    """Load a diffusers pipeline and install a dit_sparse preset on it.

    Args:
        model_id_or_path (`str`, *optional*): hub id, local folder, or ``"embedded"`` (the tiny model shipped in
            the package); defaults to the preset's ``model_id``.
        preset (`str` or `Preset`, *optional*): preset name (``dit_sparse.list_presets()``); None loads the
            stock pipeline.
        torch_dtype (`torch.dtype`, *optional*): passed to ``from_pretrained``.
        device (*optional*): the pipeline is moved there.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained`` (e.g. ``local_files_only``).

    Raises:
        ValueError: unknown preset, no model given, a preset for another model family than the one loaded, or a
            folder that is not a diffusers pipeline (no ``model_index.json``).
        FileNotFoundError: a path (``./x``, ``/x``, ``~/x``, or anything that is not ``owner/name``) that does
            not exist.
    """
    from diffusers import DiffusionPipeline

    from ..apply import apply
    from .presets import get_preset

    if isinstance(preset, str):
        preset = get_preset(preset)
    if model_id_or_path is None:
        if preset is None:
            raise ValueError("load_pipeline needs a model id or path, or a preset (which names its model).")
        model_id_or_path = preset.model_id
    if torch_dtype is not None:
        from_pretrained_kwargs["dtype"] = torch_dtype  # diffusers 0.42 name (torch_dtype is deprecated there)
    if model_id_or_path == "embedded":  # the tiny model shipped in the package (from_pretrained on its folder)
        from ...tiny.model import ASSET_DIR

        model_id_or_path = str(ASSET_DIR)
        from_pretrained_kwargs.setdefault("local_files_only", True)
    else:
        _check_model_path(str(model_id_or_path))
    pipe = DiffusionPipeline.from_pretrained(model_id_or_path, **from_pretrained_kwargs)
    if device is not None:
        pipe = pipe.to(device)
    if preset is not None:
        apply(pipe, preset.name)
    return pipe


def _check_model_path(model: str) -> None:
    """A local path must be a diffusers pipeline folder; anything else must look like a hub id (``owner/name``)."""
    from pathlib import Path

    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a diffusers pipeline folder: it has no model_index.json; save one "
                             "with pipe.save_pretrained(folder), or pass a hub id such as "
                             "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'.")
    elif folder.exists():
        raise ValueError(f"{model!r} is a file; pass the diffusers pipeline folder that holds model_index.json.")
    elif not looks_like_hub_id(model):
        raise FileNotFoundError(f"{model!r}: no such folder, and not a hub id (owner/name); check the path.")


def looks_like_hub_id(model: str) -> bool:
    """``owner/name`` with no path syntax (``./``, ``/``, ``~``, ``\\``)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not model.startswith((".", "~"))
