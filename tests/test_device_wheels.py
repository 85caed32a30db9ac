"""scripts/device_wheels.py: the two-call carry of the GPU suite's packages, run on CPU with small fake parts.

The device half (``stash`` in call 1, ``unpack`` in call 2) runs here through the exact command text that
``device_commands`` prints (only the /tmp folders and the final suite command are swapped for test ones), in a
throw-away git checkout holding the script and the split parts.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("device_wheels", ROOT / "scripts" / "device_wheels.py")
dw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dw)

#: what the fake suite prints: every package imported from the site, cutlass's dsl_packages entry included
SUITE = ('python3 -c "import fakebase, fakeextra, fakedsl; '
         "print('SUITE-RAN', fakebase.V, fakeextra.V, fakedsl.V, len(fakeextra.blob()))\"")
BASE_ONLY = ('python3 -c "import fakebase, importlib.util as u; '
             "print('BASE-RAN', fakebase.V, u.find_spec('fakeextra'))\"")


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture
def repo(tmp_path):
    """A git checkout with the script, 20 KB of tracked files, and base / extras archives (extras ~300 KB of
    incompressible bytes, so the split has something to cut)."""
    r = tmp_path / "repo"
    _write(r / "scripts" / "device_wheels.py", (ROOT / "scripts" / "device_wheels.py").read_text())
    _write(r / "README.md", "x" * 20_000)
    shutil.copy(ROOT / ".gitignore", r / ".gitignore")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=r, check=True)
    subprocess.run([*git, "add", "-A"], cwd=r, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=r, check=True)
    base, extras = tmp_path / "stage-base", tmp_path / "stage-extras"
    _write(base / "fakebase" / "__init__.py", "V = 'base-1'\n")
    _write(extras / "fakeextra" / "__init__.py",
           "import pathlib\nV = 'extra-2'\n\ndef blob():\n    return (pathlib.Path(__file__).parent / 'blob.bin')"
           ".read_bytes()\n")
    _write(extras / "fakeextra" / "blob.bin", os.urandom(300_000))
    _write(extras / "nvidia_cutlass_dsl" / "dsl_packages" / "fakedsl" / "__init__.py", "V = 'dsl-3'\n")
    dw.pack(base, tmp_path / "base.tar.xz", preset=0)
    dw.pack(extras, tmp_path / "extras.tar.xz", preset=0)
    return r


def _split(repo: Path, tmp_path: Path, room: int = 200_000) -> dict:
    """Split so that part A holds ``room`` bytes of the extras and part B the rest."""
    limit = dw.tree_bytes(repo) + room
    return dw.split(tmp_path / "base.tar.xz", tmp_path / "extras.tar.xz", repo, 0, {"base": ["fakebase"],
                    "fa4": ["fakeextra"]}, limit=limit)


def _run(command: str, repo: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    if not (shim / "python3").exists():
        (shim / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def _commands(tmp_path: Path, suite: str = SUITE) -> tuple[str, str]:
    return dw.device_commands(stash=str(tmp_path / "stash"), site=str(tmp_path / "site"), suite=suite)


@pytest.mark.parametrize("room", [200_000, 400_000], ids=["tight", "roomy"])
def test_two_calls_join_and_install(repo, tmp_path, room):
    manifest = _split(repo, tmp_path, room)
    a, b = repo / dw.CARRY_A, repo / dw.CARRY_B
    parts = manifest["extras"]["parts"]
    assert [p["bytes"] > 0 for p in parts] == [True, True], "both calls must carry a piece of the extras"
    limit = dw.tree_bytes(repo) + room  # what _split allowed per call
    for folder in (a, b):
        assert dw.tree_bytes(repo) + dw.folder_bytes(folder) <= limit
    if room == 400_000:  # with room to spare, balanced: the two calls keep the same slack
        assert abs(dw.folder_bytes(a) - dw.folder_bytes(b)) < 5_000
    # the carried folders are ignored (they travel only when named in carry)
    ignored = subprocess.run(["git", "check-ignore", dw.CARRY_A, dw.CARRY_B], cwd=repo, capture_output=True,
                             text=True)
    assert ignored.stdout.split() == [dw.CARRY_A, dw.CARRY_B]
    call1, call2 = _commands(tmp_path)
    # call 1 on the device carries only part A: part B is not there
    shutil.move(b, tmp_path / "held_b")
    res = _run(call1, repo, tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "stash" / "probe").exists() and "stashed" in res.stdout
    # call 2 carries only part B
    shutil.move(a, tmp_path / "held_a")
    shutil.move(tmp_path / "held_b", b)
    res = _run(call2, repo, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUITE-RAN base-1 extra-2 dsl-3 300000" in res.stdout, res.stdout + res.stderr
    assert "WARNING" not in res.stderr


def test_call_2_alone_installs_base_and_says_why(repo, tmp_path):
    """The machine went back between the calls (no probe): the suite still runs, without the extras."""
    _split(repo, tmp_path)
    _, call2 = _commands(tmp_path, suite=BASE_ONLY)
    res = _run(call2, repo, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BASE-RAN base-1 None" in res.stdout
    assert "no probe" in res.stderr and "WITHOUT ['fakeextra']" in res.stderr


def test_a_corrupt_part_a_is_refused(repo, tmp_path):
    _split(repo, tmp_path)
    call1, _ = _commands(tmp_path)
    _, call2 = _commands(tmp_path, suite=BASE_ONLY)
    assert _run(call1, repo, tmp_path).returncode == 0
    part = tmp_path / "stash" / "extras.part0"
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF
    part.write_bytes(bytes(data))
    res = _run(call2, repo, tmp_path)
    assert res.returncode == 0 and "BASE-RAN base-1 None" in res.stdout, res.stdout + res.stderr
    assert "fail their SHA-256" in res.stderr


def test_call_2_without_its_carry_still_runs_the_suite(repo, tmp_path):
    """``.carry_b`` not carried (or never prepared): unpacking fails loudly, the suite runs all the same."""
    _, call2 = _commands(tmp_path, suite='python3 -c "print(\'SUITE-RAN\')"')
    res = _run(call2, repo, tmp_path)
    assert res.returncode == 0 and "SUITE-RAN" in res.stdout, res.stdout + res.stderr
    assert "no .carry_b/manifest.json" in res.stderr


def test_split_refuses_what_two_calls_cannot_carry(repo, tmp_path):
    with pytest.raises(SystemExit, match="do not fit in two device calls"):
        _split(repo, tmp_path, room=100_000)  # 2 x 100 KB < base + ~300 KB of extras


def test_device_commands_fit_the_run_tool_and_are_documented():
    call1, call2 = dw.device_commands()
    assert len(call1) <= 2000 and len(call2) <= 2000
    assert dw.CARRY_A in call1 and dw.CARRY_B in call2 and 'benchmarks/gpu_suite.py "$OUT"' in call2
    doc = " ".join((ROOT / "benchmarks" / "gpu_suite.py").read_text().split())
    assert call1 in doc and call2 in doc, "gpu_suite.py's docstring must show the device commands as printed"


def test_cli_from_another_folder(tmp_path):
    """As the README shows it: `python scripts/device_wheels.py ...`, here from another folder. (`prepare` downloads
    about 270 MB and compresses for minutes: run by hand, not here.) `commands` prints the device commands where
    `prepare` has split the parts, and otherwise says to run it."""
    script = str(ROOT / "scripts" / "device_wheels.py")
    res = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "prepare" in res.stdout and "unpack" in res.stdout
    res = subprocess.run([sys.executable, script, "commands"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    if (ROOT / dw.CARRY_B).exists():
        assert res.returncode == 0, res.stderr
        call1, call2 = dw.device_commands()
        assert call1 in res.stdout and call2 in res.stdout and "MiB" in res.stdout
    else:
        assert res.returncode == 1 and "device_wheels.py prepare` first" in res.stderr
