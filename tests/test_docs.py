"""The documentation stays self-contained and the sources say what the code does, not how it came to be.

* every tracked text file points readers only to documents inside the repository: no design notes that a clone
  does not hold, and no section numbers of such notes;
* every ``docs/<page>.md#<anchor>`` reference (and every relative link inside ``docs/``) names a page that exists
  and, with an anchor, a heading of that page (GitHub's anchor rules);
* comments and string literals in the Python and shell sources of the package, tests, benchmarks and scripts do
  not speak of the project's work history (issue numbers, work-item tags).
"""

from __future__ import annotations

import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: design notes that live outside the repository (names assembled so that this file does not mention them)
_NOTES = ("ALGORITHMS", "ENVIRONMENT", "STYLE", "LAYOUT")
EXTERNAL_NOTES = re.compile(r"\b(?:" + "|".join(_NOTES) + r")\.md\b"
                            + r"|\b(?:" + "|".join(_NOTES[:2]) + r")\s+(?:\u00a7|section\s+\d)"
                            + r"|\.\./" + "shared" + r"\b")
#: a section number of those notes quoted without the file name (the section sign and a digit)
BARE_SECTION = re.compile("\u00a7" + r"\s*\d")
#: ``docs/<page>.md`` with an optional ``#anchor``, as code and top-level files write it
DOC_REF = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
#: markdown links inside docs/: ``[text](page.md#anchor)``, ``(../README.md)``, ``(#anchor)``
MD_LINK = re.compile(r"\]\(([^)\s]*)\)")
#: work history: issue numbers ("issue 14", "Issues 12"), work-item tags ("i13-harness"), quoted issue titles
HISTORY = re.compile(r"\bissues?\s+\d+\b|\bi1\d-[a-z]+\b|\bissue\s+\"[A-Z]", re.IGNORECASE)
HISTORY_DIRS = ("dit_sparse/", "tests/", "benchmarks/", "scripts/")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover - not a git checkout
        pytest.skip(f"not a git checkout ({e}); the documentation checks read `git ls-files`")
    return [name for name in out.decode().split("\0") if name]


def _text(path: str) -> str | None:
    """The file's text, or None for binary files, results and files missing from the work tree."""
    if path.startswith("benchmarks/results/"):
        return None
    full = ROOT / path
    if not full.is_file():
        return None
    data = full.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _files() -> dict[str, str]:
    return {p: t for p in _tracked() if (t := _text(p)) is not None}


def _hits(pattern: re.Pattern, files: dict[str, str]) -> list[str]:
    out = []
    for path, text in files.items():
        for n, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                out.append(f"{path}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}")
    return out


# ---------------------------------------------------------------------------------------------------- anchors
def github_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: markup dropped, lowercase, punctuation removed, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Anchors of every heading of ``page`` (duplicates get ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_github_anchor_rules():
    assert github_anchor("Row combine") == "row-combine"
    assert github_anchor("Rectification and Re-ttention do not combine") == \
        "rectification-and-re-ttention-do-not-combine"
    assert github_anchor("`row_topk`") == "row_topk"
    assert github_anchor("Models: grids, text and presets") == "models-grids-text-and-presets"


# ---------------------------------------------------------------------------------------------------- checks
def test_no_reference_to_notes_outside_the_repository():
    """(a) Readers of a clone can follow every reference: none to the workspace's design notes."""
    hits = _hits(EXTERNAL_NOTES, _files())
    assert not hits, (f"{len(hits)} references to documents outside the repository; point to docs/<page>.md#<anchor> "
                      "instead:\n" + "\n".join(hits))


def test_no_bare_section_numbers():
    """(a) Section numbers of those notes without the file name are references a clone cannot follow either
    (lines that name the notes are left to the test above)."""
    files = {p: "\n".join("" if EXTERNAL_NOTES.search(line) else line for line in t.splitlines())
             for p, t in _files().items()}
    hits = _hits(BARE_SECTION, files)
    assert not hits, (f"{len(hits)} section-number references; point to docs/<page>.md#<anchor> instead:\n"
                      + "\n".join(hits))


def test_doc_references_resolve():
    """(b) ``docs/<page>.md#<anchor>`` anywhere, and relative links inside docs/, name existing pages and
    headings."""
    files = _files()
    cache: dict[Path, set[str]] = {}
    bad = []

    def check(where: str, page: Path, anchor: str | None) -> None:
        if not page.is_file():
            bad.append(f"{where}: no page {page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}")
            return
        if anchor and page.suffix == ".md":
            if page not in cache:
                cache[page] = anchors(page)
            if anchor not in cache[page]:
                bad.append(f"{where}: {page.relative_to(ROOT)} has no heading with anchor #{anchor} "
                           f"(anchors: {', '.join(sorted(cache[page]))})")

    for path, text in files.items():
        for n, line in enumerate(text.splitlines(), 1):
            for m in DOC_REF.finditer(line):
                check(f"{path}:{n}", DOCS / m.group(1), m.group(2))
            if path.startswith("docs/") and path.endswith(".md"):
                for m in MD_LINK.finditer(line):
                    target = m.group(1)
                    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                        continue
                    file_part, _, anchor = target.partition("#")
                    page = (ROOT / path).parent / file_part if file_part else ROOT / path
                    check(f"{path}:{n}", page.resolve(), anchor or None)
    assert not bad, f"{len(bad)} documentation references do not resolve:\n" + "\n".join(bad)


def _comments_and_strings(path: str, text: str):
    """``(line, text)`` of every comment and string literal of a Python file (the whole line for shell files)."""
    if not path.endswith(".py"):
        for n, line in enumerate(text.splitlines(), 1):
            yield n, line
        return
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
                for i, part in enumerate(tok.string.splitlines()):
                    yield tok.start[0] + i, part
    except (tokenize.TokenError, SyntaxError):  # pragma: no cover - a file that does not tokenize: scan it whole
        for n, line in enumerate(text.splitlines(), 1):
            yield n, line


def test_sources_do_not_speak_of_work_history():
    """(c) Comments, docstrings and messages describe the code, not the issues or work items that produced it."""
    hits = []
    for path, text in _files().items():
        if not path.startswith(HISTORY_DIRS) or not path.endswith((".py", ".sh")) or path == "tests/test_docs.py":
            continue
        for n, part in _comments_and_strings(path, text):
            for m in HISTORY.finditer(part):
                hits.append(f"{path}:{n}: {m.group(0)!r} in {part.strip()[:100]!r}")
    assert not hits, (f"{len(hits)} mentions of work history in comments or strings; say what the code does "
                      "instead:\n" + "\n".join(hits))


def test_history_pattern_spares_code():
    """The history pattern flags history, not ordinary code and prose."""
    flagged = ["# --- issue 13 (i13-harness)", "the sharp-attention safeguard of issue 14", "Issues 12 and 15",
               '(issue "Core engine" item 7)']
    spared = ["raise ValueError('please report an issue')", "FastVideo issues #225 ask for shapes",
              "triton-lang/triton#11584", "issues the same collectives", "the issue's targets", "i1 = 3",
              "x = pi16-alpha", "issue_14 = None"]
    assert all(HISTORY.search(s) for s in flagged)
    assert not any(HISTORY.search(s) for s in spared)
