"""Every number in the README's results tables is in the results file the table names.

A results table is a README table in the "Results" section, one with a number of two or more decimals in its body
(a measurement, not a model version), or one whose source line is there. The line just above it names where its numbers
come from: ``(from benchmarks/results/NAME[, benchmarks/results/NAME2], written by benchmarks/SCRIPT.py ...)``.
The test checks that the script exists and writes files of that name, and that every number printed in the table
(integers, decimals, percentages, ``1.19x`` ratios, ``630 ms``) is a number of one of the files at the printed
precision (a value ``v`` matches ``p`` printed with ``d`` decimals when ``|v - p| <= 0.5 * 10**-d``; ``v * 100``
and ``v / 1000`` count too, for percentages and ms printed as s). Numbers inside backticks are names (preset names,
code) and are not checked. Results files the current scripts cannot rewrite (:data:`EARLIER`) must be marked as
coming from an earlier version of the code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

#: results files written by an earlier version of the benchmark scripts, in a format the current ones no longer
#: write (and the end-to-end file merges two runs by hand); no GPU has been available to rerun them
EARLIER = {
    "attention-NVIDIA_H100_80GB_HBM3.json": "6c838c7",
    "plan_overhead-NVIDIA_H100_80GB_HBM3.json": "6c838c7",
    "end_to_end-NVIDIA_H100_80GB_HBM3.json": "6c838c7",
}

_SOURCE = re.compile(r"^\(from (?P<what>.*)\)\s*$")
_FILE = re.compile(r"benchmarks/results/([\w.\-]+)")
_SCRIPT = re.compile(r"written (?:on [\d-]+ )?by (?:an earlier version of )?`?(benchmarks/\w+\.py)`?")
#: a number not glued to a word (so "Wan2.1", "720p", "21x30x52" are not numbers), thousands with a comma or a
#: space, with its unit where it changes the stored value ("6.25%": a fraction or a percentage; "21.5 s": seconds or
#: ms) or marks a ratio ("1.19x")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:(?:,| )\d{3})+|\d+)(?:\.\d+)?(?:[x%]| s\b)?(?![\w.])")


def tables(text: str) -> list[tuple[int, str, list[str]]]:
    """``(line number, the source line above, rows)`` of every table (the header row first, then the separator)."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            found.append((start + 1, above.strip(), lines[start:i]))
        i += 1
    return found


def numbers_in(row: str) -> list[str]:
    """The numbers printed in one table row, names in backticks left out."""
    row = re.sub(r"`[^`]*`", " ", row)
    return [m.group(0) for m in _NUMBER.finditer(row)]


def _key(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _walk(obj, path: tuple[str, ...], out: dict[str, list[float]]) -> None:
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        out.setdefault(_key(path), []).append(float(obj))
    elif isinstance(obj, str):
        out.setdefault(_key(path), []).extend(_number(n) for n in numbers_in(obj))
    elif isinstance(obj, dict):
        # a dict keyed by data ("block16_top10", "rect 0.8", layer "0"): one field across its entries
        labels = len(obj) > 1 and all(re.search(r"\d", str(k)) for k in obj)
        for k, v in obj.items():
            _walk(v, (*path, "*" if labels else str(k)), out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, path, out)


def fields(name: str) -> dict[str, list[float]]:
    """``{field: its values}`` of one results file: a field is a key path from the root, list positions dropped,
    so a column's field is one name across the file's records (a markdown file is one field: all its numbers)."""
    path = RESULTS / name
    text = path.read_text()
    if path.suffix == ".json":
        out: dict[str, list[float]] = {}
        _walk(json.loads(text), (name,), out)
        return out
    return {name: [_number(n) for n in numbers_in(text)]}


def _number(printed: str) -> float:
    return float(re.sub(r"[x%s]$", "", printed.replace(",", "").replace(" ", "")))


def matches(printed: str, values: list[float]) -> bool:
    """``printed`` (with its unit) is one of ``values`` at its printed precision."""
    unit = "%" if printed.endswith("%") else "s" if printed.endswith(" s") else ""
    s = re.sub(r"[x%s]$", "", printed.replace(",", "").replace(" ", ""))
    p = float(s)
    decimals = len(s.split(".")[1]) if "." in s else 0
    tol = 0.5 * 10.0**-decimals + 1e-9
    scales = {"%": (1.0, 100.0), "s": (1.0, 1e-3), "": (1.0,)}[unit]
    return any(abs(v * scale - p) <= tol for v in values for scale in scales)


def columns(header: str, rows: list[str]) -> dict[str, list[tuple[str, str]]]:
    """``{"column header #i": [(row label, number), ...]}``: the i-th number of each cell of a column (a cell like
    "0.250 / 0.263" or "0.0058 (0.02x)" holds several quantities)."""
    names = [c.strip() for c in header.strip().strip("|").split("|")]
    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for j, cell in enumerate(cells):
            for i, n in enumerate(numbers_in(cell)):
                name = names[j] if j < len(names) else f"column {j + 1}"
                out.setdefault(f"{name} #{i + 1}", []).append((cells[0][:40], n))
    return out


def results_tables():
    text = README.read_text()
    start = text.index("\n## Results\n")
    end = text.index("\n## ", start + 1)
    first, last = text[:start].count("\n") + 1, text[:end].count("\n") + 1
    out = []
    for line, above, rows in tables(text):
        measured = any("." in n and len(n.split(".")[1]) >= 2 for r in rows[2:] for n in numbers_in(r))
        if first <= line <= last or measured or _SOURCE.match(above):
            out.append(pytest.param(line, above, rows, id=f"README line {line}"))
    return out


def test_the_readme_has_results_tables():
    assert len(results_tables()) >= 8


@pytest.mark.parametrize("line, above, rows", results_tables())
def test_every_number_of_a_results_table_is_in_its_results_file(line, above, rows):
    source = _SOURCE.match(above)
    assert source, (
        f"README line {line}: the line above this table must name its results file, "
        f"'(from benchmarks/results/NAME, written by benchmarks/SCRIPT.py)'; got {above!r}"
    )
    names = _FILE.findall(source["what"])
    script = _SCRIPT.search(source["what"])
    assert names and script, f"README line {line}: name the results file(s) and the script: {above!r}"
    script_path = ROOT / script[1]
    assert script_path.is_file(), f"README line {line}: {script[1]} does not exist"
    for name in names:
        assert (RESULTS / name).is_file(), f"README line {line}: benchmarks/results/{name} does not exist"
        stem = re.sub(r"-(cpu|NVIDIA\w*)$", "", Path(name).stem)
        assert re.sub(r"\d+$", "", stem) in script_path.read_text(), (
            f"README line {line}: {script[1]} does not write {name}"
        )
        if name in EARLIER:
            assert "earlier version" in above and EARLIER[name] in above, (
                f"README line {line}: {name} cannot be rewritten by the current {script[1]}: say that the rows come "
                f"from an earlier version of the code (commit {EARLIER[name]})"
            )
    found = {k: v for name in names for k, v in fields(name).items()}
    missing = []
    for column, cells in columns(rows[0], rows[2:]).items():
        # the column's numbers come from one field of the named files
        best = max(found, key=lambda k: sum(matches(n, found[k]) for _, n in cells))
        miss = [(label, n) for label, n in cells if not matches(n, found[best])]
        if miss:
            missing.append(f"column {column!r} (closest field {best}): {miss}")
    assert not missing, (
        f"README line {line}: numbers not in {', '.join(names)}:\n"
        + "\n".join(missing)
        + "\nrerun the script and copy its numbers, or fix the table"
    )


def test_layout_padding_script_writes_the_committed_numbers(tmp_path):
    """As the README shows it (python benchmarks/layout_padding.py), from another folder: the counts the current
    layout code gives are the ones in benchmarks/results/layout-padding-cpu.json."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/layout_padding.py"), "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = json.loads((tmp_path / "layout-padding-cpu.json").read_text())["rows"]
    assert fresh == json.loads((RESULTS / "layout-padding-cpu.json").read_text())["rows"], (
        "the layout's slot counts changed: rerun python benchmarks/layout_padding.py and update the README table"
    )


def test_structured_quality_script_runs_from_another_folder(tmp_path):
    """python benchmarks/structured_quality.py as the README shows it; --smoke keeps it short and writes nothing
    (tests/engine/methods/test_engine.py checks the full numbers against the results file)."""
    res = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks/structured_quality.py"), "--smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "draft+rect (row)" in res.stdout and not list(tmp_path.iterdir())
