"""The model-family table (``dit_sparse.integration.adapters.registry.FAMILIES``): each family has an adapter module
whose ``SPEC`` names it, every preset's family is in it, and no transformer class is served twice."""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import dit_sparse.integration.adapters as adapters_pkg
from dit_sparse.integration.adapters.base import AdapterSpec, get_adapter
from dit_sparse.integration.adapters.registry import FAMILIES, family_of, load_spec, supported_transformers
from dit_sparse.integration.pipelines.presets import PRESETS


def test_every_family_has_an_adapter_module_whose_spec_names_it():
    for name, family in FAMILIES.items():
        assert family.name == name
        spec = importlib.import_module(f"dit_sparse.integration.adapters.{family.module}").SPEC
        assert isinstance(spec, AdapterSpec)
        assert spec.family == family, f"{family.module}.SPEC serves {spec.family}, the table says {family}"
        assert load_spec(family) is spec
        assert get_adapter(type(family.transformer, (), {})()) is spec


def test_every_adapter_module_is_in_the_table():
    shared = {"__init__", "base", "registry"}
    modules = {p.stem for p in Path(adapters_pkg.__file__).parent.glob("*.py")} - shared
    assert modules == {f.module for f in FAMILIES.values()}


def test_every_preset_family_is_in_the_table():
    unknown = {p.name: p.family for p in PRESETS.values() if p.family not in FAMILIES}
    assert not unknown, f"presets of families missing from FAMILIES: {unknown}"
    for p in PRESETS.values():
        assert p.transformer_class == FAMILIES[p.family].transformer


def test_no_transformer_class_is_served_twice():
    for what in ("transformer", "module"):
        counts = Counter(getattr(f, what) for f in FAMILIES.values())
        twice = sorted(k for k, n in counts.items() if n > 1)
        assert not twice, f"{what} declared by more than one family: {twice}"
    assert supported_transformers() == sorted(f.transformer for f in FAMILIES.values())
    for family in FAMILIES.values():
        assert family_of(family.transformer) is family
    assert family_of("NoSuchTransformer") is None and family_of(None) is None
