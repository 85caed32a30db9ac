"""The supported model families, each declared once: name, diffusers transformer class, adapter module.

Light on purpose (no torch, no diffusers): the presets and the command line's model checks read it before any model
loads. Each adapter module's ``SPEC`` carries its :class:`Family`; :func:`load_spec` imports the module on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "family_of", "supported_transformers", "load_spec", "ADDING_A_MODEL"]


@dataclass(frozen=True)
class Family:
    """One model family.

    Args:
        name: the family's name, as presets and the command line spell it (``"hunyuanvideo"``).
        transformer: the diffusers transformer class name it runs on.
        module: the adapter module under ``dit_sparse.integration.adapters`` defining its ``SPEC``.
    """

    name: str
    transformer: str
    module: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("wan", "WanTransformer3DModel", "wan"),
    Family("hunyuanvideo", "HunyuanVideoTransformer3DModel", "hunyuan_video"),
    Family("cogvideox", "CogVideoXTransformer3DModel", "cogvideox"),
    Family("ltx", "LTXVideoTransformer3DModel", "ltx"),
    Family("flux", "FluxTransformer2DModel", "flux"),
    Family("sd3", "SD3Transformer2DModel", "sd3"),
    Family("wan-vace", "WanVACETransformer3DModel", "wan_vace"),
    Family("wan-animate", "WanAnimateTransformer3DModel", "wan_animate"),
    Family("skyreels-v2", "SkyReelsV2Transformer3DModel", "skyreels_v2"),
    Family("qwenimage", "QwenImageTransformer2DModel", "qwenimage"),
    Family("hunyuanvideo15", "HunyuanVideo15Transformer3DModel", "hunyuan_video15"),
    Family("ltx2", "LTX2VideoTransformer3DModel", "ltx2"),
    Family("cosmos", "CosmosTransformer3DModel", "cosmos"),
    Family("mochi", "MochiTransformer3DModel", "mochi"),
    Family("flux2", "Flux2Transformer2DModel", "flux2"),
    Family("kandinsky6", "Kandinsky6Transformer3DModel", "kandinsky6"),
)}

_BY_TRANSFORMER = {f.transformer: f for f in FAMILIES.values()}

#: where the recipe for a new model lives (named by the unsupported-model error)
ADDING_A_MODEL = "the section 'Adding a model' of ARCHITECTURE.md in the dit_sparse source tree"


def family_of(transformer: str | None) -> Family | None:
    """The family running on the transformer class named ``transformer``, or None."""
    return _BY_TRANSFORMER.get(transformer)


def supported_transformers() -> list[str]:
    """The transformer class names served, sorted."""
    return sorted(_BY_TRANSFORMER)


def load_spec(family: Family):
    """The :class:`~dit_sparse.integration.adapters.base.AdapterSpec` of ``family`` (imports its adapter module)."""
    return importlib.import_module(f"{__package__}.{family.module}").SPEC
