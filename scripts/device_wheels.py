"""Bring the GPU suite's packages to the device machine in two calls (docs/testing.md#device-runs).

The device machine has torch and triton but no diffusers, flash-attn-4 (CuTe DSL) or comfy-kitchen, and no
network. One device call carries at most 64 MiB (the repository's files count), and the packages are about
104 MB even xz-compressed (nvidia-cutlass-dsl-libs-cu13 alone is a 92 MB wheel). So, on the CPU machine:

    python scripts/device_wheels.py prepare        # download, install to a staging folder, compress, split

which downloads the pinned cp312 manylinux x86_64 wheels (``pip download``) into ``.whl/``, installs them into a
staging folder with ``pip install --no-index --no-deps --target`` (on this machine, for the device's Python:
no pip run is needed there), drops what the device never loads (comfy-kitchen's 158 MB ROCm library, console
scripts), packs ``base.tar.xz`` (diffusers and its one missing requirement) and ``extras.tar.xz`` (flash-attn-4 with
its CuTe DSL packages, comfy-kitchen), and splits the extras over two ignored folders that each fit one call
next to the repository: ``.carry_a/`` (call 1) and ``.carry_b/`` (call 2: the rest, base and a manifest with
SHA-256 sums). It then prints the two device ``run`` commands (``commands`` prints them again, re-measured):

* call 1 (carry ``.carry_a``): ``stash`` copies part A to ``/tmp`` and writes a probe file there, and prints
  the machine's GPU and package versions;
* call 2 (carry ``.carry_b``), at once while the machine is warm (about 30 s): ``unpack`` reads the probe,
  joins part A from ``/tmp`` with part B, checks the SHA-256 and extracts everything into a site folder, then the
  GPU suite runs. If the machine went back between the calls (no probe, or a part fails its checksum), it says
  so, installs only ``base`` (the suite still runs; the flash-attn-4 and Sol-Attn rows then say "not installed").

``stash`` and ``unpack`` use the standard library only (the device's Python 3.12).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
#: what one device call may carry: the repository's tracked and untracked-not-ignored files plus carried paths
CALL_LIMIT = 64 * MIB
#: left free in each call for files added to the repository between ``prepare`` and the device run
DEFAULT_MARGIN = 2 * MIB
#: the device run's ``run`` command limit
COMMAND_LIMIT = 2000
CARRY_A, CARRY_B = ".carry_a", ".carry_b"
STASH, SITE = "/tmp/carry", "/tmp/site"
SUITE = 'python3 benchmarks/gpu_suite.py "$OUT"'

#: pinned cp312 wheels. base: diffusers and what it needs beyond the device's packages (importlib_metadata 10
#: needs lazy-importer); fa4: flash-attn-4 and its CuTe DSL stack (the cu13 flavour: the device runs CUDA 13);
#: comfy: the Sol-Attn peer. einops, cuda-bindings, protobuf, typing-extensions are on the device already.
PACKAGES = {
    "base": ["diffusers==0.42.1", "importlib_metadata==10.2.0", "lazy-importer==0.1.0"],
    "fa4": ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl==4.8.1", "nvidia-cutlass-dsl-libs-base==4.8.1",
            "nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia-cutlass-dsl-libs-cu13==4.8.1", "quack-kernels==0.6.5",
            "apache-tvm-ffi==0.1.15.post2", "torch-c-dlpack-ext==0.1.5"],
    "comfy": ["comfy-kitchen==0.2.40"],
}
#: files the device never loads: comfy-kitchen's ROCm build (imported only under a HIP torch), console scripts
PRUNE = ["comfy_kitchen/backends/hip/_C.abi3.so", "bin"]
#: folders the suite's PYTHONPATH needs: the site, and cutlass's dsl_packages (its .pth file is not read from a
#: PYTHONPATH entry)
PATH_DIRS = ["", "nvidia_cutlass_dsl/dsl_packages"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


# ---------------------------------------------------------------------------------------------------- CPU side
def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels with every call besides the carried paths: tracked files, untracked files git does
    not ignore, and a ``shared/`` folder in the checkout."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    seen, total = set(), 0
    for name in filter(None, out.split(b"\0")):
        path = root / os.fsdecode(name)
        if path in seen or not path.is_file() or path.is_symlink():
            continue
        seen.add(path)
        total += path.stat().st_size
    shared = root / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file() and p not in seen)
    return total


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def download(groups: list[str], wheels: Path) -> dict[str, list[Path]]:
    """``pip download`` each group's pinned wheels (no dependencies: each is listed) into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = {}
    for g in groups:
        _pip("download", "-q", "--no-deps", *_target_flags(), "-d", str(wheels), *PACKAGES[g])
        found[g] = [_wheel_for(wheels, spec) for spec in PACKAGES[g]]
    return found


def _wheel_for(wheels: Path, spec: str) -> Path:
    name, _, version = spec.partition("==")
    stem = name.replace("-", "_").lower()
    hits = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if len(hits) != 1:
        raise SystemExit(f"expected one wheel for {spec} in {wheels}, found {[p.name for p in hits]}")
    return hits[0]


def stage(wheels: list[Path], folder: Path) -> None:
    """Install ``wheels`` into ``folder`` for the device's Python (pip --target, no index, no dependencies)."""
    if folder.exists():
        shutil.rmtree(folder)
    _pip("install", "-q", "--no-index", "--no-deps", "--no-compile", *_target_flags(), "--target", str(folder),
         *map(str, wheels))
    for rel in PRUNE:
        p = folder / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def pack(folder: Path, archive: Path, preset: int = 9 | lzma.PRESET_EXTREME) -> None:
    """``folder``'s contents as a tar.xz (sorted names, fixed owner: the same input packs the same)."""
    tmp = archive.with_suffix(".tmp")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    xz = shutil.which("xz")
    if xz:  # the xz tool runs about twice as fast as Python's lzma here
        with open(tmp, "wb") as f:
            proc = subprocess.Popen([xz, f"-{preset & 0xF}" + ("e" if preset & lzma.PRESET_EXTREME else ""),
                                     "-T0", "-c"], stdin=subprocess.PIPE, stdout=f)
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                _add_sorted(tar, folder, clean)
            proc.stdin.close()
            if proc.wait() != 0:
                raise SystemExit(f"xz failed (exit {proc.returncode})")
    else:
        with lzma.open(tmp, "wb", preset=preset) as f, tarfile.open(fileobj=f, mode="w|") as tar:
            _add_sorted(tar, folder, clean)
    os.replace(tmp, archive)


def _add_sorted(tar: tarfile.TarFile, folder: Path, clean) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            tar.add(path, arcname=path.relative_to(folder).as_posix(), filter=clean)


def sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(MIB), b""):
                h.update(chunk)
    return h.hexdigest()


def split(base: Path, extras: Path | None, root: Path, margin: int, packages: dict,
          limit: int = CALL_LIMIT) -> dict:
    """Write ``.carry_a`` / ``.carry_b`` under ``root``: part A as large as call 1 allows, the rest of the extras
    with base and the manifest in part B. Raises SystemExit when the two calls cannot hold it all."""
    tree = tree_bytes(root)
    room = limit - tree - margin
    extras_size = extras.stat().st_size if extras else 0
    room_b = room - base.stat().st_size - 64 * 1024  # manifest
    if room <= 0 or room_b < 0 or extras_size > room + room_b:
        raise SystemExit(
            f"The packages do not fit in two device calls: each call carries at most {limit / MIB:.2f} MiB, "
            f"the repository takes {tree / MIB:.1f} MiB of it (margin {margin / MIB:.1f} MiB), base is "
            f"{base.stat().st_size / MIB:.1f} MiB and the extras {extras_size / MIB:.1f} MiB. Drop a group "
            "(--without comfy or --without fa4), or make the repository smaller.")
    a, b = root / CARRY_A, root / CARRY_B
    for d in (a, b):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
    parts = []
    if extras:
        # balanced: both calls carry about the same, so that each keeps the same slack for files added to the
        # repository before the device run
        cut = min(room, max(extras_size - room_b, (extras_size + base.stat().st_size) // 2))
        with open(extras, "rb") as src:
            for folder, size in ((a, cut), (b, extras_size - cut)):
                part = folder / f"extras.part{len(parts)}"
                with open(part, "wb") as dst:
                    _copy(src, dst, size)
                parts.append({"name": part.name, "bytes": size, "sha256": sha256(part)})
    shutil.copy2(base, b / "base.tar.xz")
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "packages": packages,
                "base": {"name": "base.tar.xz", "bytes": base.stat().st_size, "sha256": sha256(base)},
                "extras": None if not extras else {"bytes": extras_size, "sha256": sha256(extras), "parts": parts},
                "path_dirs": PATH_DIRS, "tree_bytes": tree}
    (b / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if extras:
        (a / "part0.sha256").write_text(parts[0]["sha256"] + "\n")
    return manifest


def _copy(src, dst, size: int) -> None:
    while size > 0:
        chunk = src.read(min(size, 8 * MIB))
        if not chunk:
            raise SystemExit("archive ended early while splitting")
        dst.write(chunk)
        size -= len(chunk)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def device_commands(stash: str = STASH, site: str = SITE, suite: str = SUITE) -> tuple[str, str]:
    """The two device ``run`` commands (carry ``.carry_a``, then ``.carry_b``)."""
    call1 = f"python3 scripts/device_wheels.py stash --carry {CARRY_A} --stash {stash}"
    pypath = ":".join(f"{site}/{d}".rstrip("/") for d in PATH_DIRS)
    # ';': the suite runs even if unpacking fails (it then records the packages as missing) — a lease is too scarce
    # to end on a packaging error
    call2 = (f"python3 scripts/device_wheels.py unpack --carry {CARRY_B} --stash {stash} --site {site}; "
             f'export PYTHONPATH="$PWD:{pypath}" PYTHONUNBUFFERED=1; {suite}')
    for c in (call1, call2):
        if len(c) > COMMAND_LIMIT:
            raise SystemExit(f"device command is {len(c)} characters, over the run tool's {COMMAND_LIMIT}: {c}")
    return call1, call2


def print_commands(root: Path = ROOT, margin: int = DEFAULT_MARGIN) -> int:
    tree = tree_bytes(root)
    a, b = folder_bytes(root / CARRY_A), folder_bytes(root / CARRY_B)
    if not b:
        print(f"no {CARRY_B}/ in {root}: run `python scripts/device_wheels.py prepare` first", file=sys.stderr)
        return 1
    call1, call2 = device_commands()
    print(f"repository {tree / MIB:.2f} MiB; call 1 carries {CARRY_A} {a / MIB:.2f} MiB -> "
          f"{(tree + a) / MIB:.2f} MiB; call 2 carries {CARRY_B} {b / MIB:.2f} MiB -> {(tree + b) / MIB:.2f} MiB "
          f"(limit {CALL_LIMIT / MIB:.0f} MiB each)")
    over = [n for n, size in ((CARRY_A, a), (CARRY_B, b)) if tree + size > CALL_LIMIT]
    if over:
        print(f"OVER THE LIMIT: {over}; rerun prepare (it re-measures the repository)", file=sys.stderr)
        return 1
    print("\nDevice call 1 (carry [\".carry_a\"], timeout_s 120):\n" + call1)
    print("\nDevice call 2 AT ONCE, while the machine is warm (carry [\".carry_b\"], timeout_s 600):\n" + call2)
    return 0


def prepare(args) -> int:
    groups = ["base"] + [g for g in ("fa4", "comfy") if g not in args.without]
    work = Path(args.workdir)
    found = download(groups, work / "wheels")
    archives = {}
    for name, members in (("base", ["base"]), ("extras", [g for g in groups if g != "base"])):
        if not members:
            continue
        wheels = [w for g in members for w in found[g]]
        key = sha256(*wheels)[:16] + f"-{args.preset}"
        archive = work / f"{name}-{key}.tar.xz"
        if archive.exists():
            print(f"{name}: reusing {archive} ({archive.stat().st_size / MIB:.1f} MiB)")
        else:
            folder = work / f"stage-{name}"
            stage(wheels, folder)
            print(f"{name}: {folder_bytes(folder) / MIB:.1f} MiB installed; compressing (xz -{args.preset}e; the "
                  "extras take several minutes)...", flush=True)
            pack(folder, archive, args.preset | lzma.PRESET_EXTREME)
            shutil.rmtree(folder)
            print(f"{name}: {archive.stat().st_size / MIB:.1f} MiB")
        archives[name] = archive
    packages = {g: PACKAGES[g] for g in groups}
    manifest = split(archives["base"], archives.get("extras"), ROOT, int(args.margin_mib * MIB), packages)
    print(json.dumps({k: manifest[k] for k in ("base", "extras")}, indent=1))
    return print_commands(ROOT)


# ---------------------------------------------------------------------------------------------------- device side
def stash(args) -> int:
    """Call 1: copy part A to the stash folder, write the probe, print the machine's GPU and package versions."""
    src, dst = Path(args.carry), Path(args.stash)
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for p in sorted(src.iterdir()) if src.is_dir() else []:
        shutil.copy2(p, dst / p.name)
        copied += p.stat().st_size
    want = (src / "part0.sha256").read_text().strip() if (src / "part0.sha256").exists() else None
    got = sha256(dst / "extras.part0") if (dst / "extras.part0").exists() else None
    if want and got != want:
        print(f"part A copy in {dst} fails its SHA-256 ({got} != {want})", file=sys.stderr)
        return 1
    probe = {"time": time.time(), "boot_id": _boot_id(), "host": platform.node(), "part0_sha256": got}
    (dst / "probe").write_text(json.dumps(probe))
    print(f"stashed {copied / MIB:.1f} MiB from {src}/ in {dst}/; probe {probe}")
    _inventory()
    return 0


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _inventory() -> None:
    from importlib import metadata

    names = ["torch", "triton", "cuda-bindings", "cuda-python", "einops", "protobuf", "typing_extensions",
             "numpy", "transformers", "huggingface_hub", "safetensors", "accelerate", "hypothesis", "pytest",
             "pytest-xdist", "diffusers", "flash-attn-4", "xformers"]
    versions = {}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            versions[n] = None
    print(f"python {platform.python_version()}; packages {versions}")
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        print("nvidia-smi:", (res.stdout or res.stderr).strip())


class _Joined(io.RawIOBase):
    """Several files read as one stream (part A from the stash, part B from the carry)."""

    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.files:
            n = self.files[0].readinto(buf)
            if n:
                return n
            self.files.pop(0).close()
        return 0


def _extract(stream, site: Path) -> int:
    count = 0
    with lzma.open(stream, "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        for member in tar:
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extract(member, site, **kw)
            count += 1
    return count


def unpack(args) -> int:
    """Call 2: base always; the extras when part A is in the stash (probe present) and both parts check out."""
    carry, stash_dir, site = Path(args.carry), Path(args.stash), Path(args.site)
    manifest_path = carry / "manifest.json"
    if not manifest_path.exists():
        print(f"no {manifest_path}: carry {CARRY_B} in this call (prepare writes it)", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    site.mkdir(parents=True, exist_ok=True)
    base = carry / manifest["base"]["name"]
    if sha256(base) != manifest["base"]["sha256"]:
        print(f"{base} fails its SHA-256: prepare again", file=sys.stderr)
        return 1
    with open(base, "rb") as f:
        n = _extract(f, site)
    print(f"base: {n} files into {site} ({', '.join(manifest['packages']['base'])})")
    extras = manifest.get("extras")
    if extras:
        probe = stash_dir / "probe"
        parts = [stash_dir / extras["parts"][0]["name"], *[carry / p["name"] for p in extras["parts"][1:]]]
        problem = None
        if not probe.exists():
            problem = (f"no probe {probe}: the machine was given back between call 1 and call 2 (or call 1 did not "
                       "run)")
        elif not all(p.exists() for p in parts):
            problem = f"missing part(s): {[str(p) for p in parts if not p.exists()]}"
        elif sha256(*parts) != extras["sha256"]:
            problem = "the joined parts fail their SHA-256 (part A is from another prepare?)"
        if problem:
            names = [s for g, specs in manifest["packages"].items() if g != "base" for s in specs]
            print(f"WARNING: {problem}. Going on WITHOUT {names}: their benchmark rows will say 'not installed'. "
                  "To test them, run call 1 and call 2 again back to back.", file=sys.stderr)
        else:
            info = json.loads(probe.read_text())
            age = time.time() - info.get("time", 0)
            same_boot = info.get("boot_id") == _boot_id()
            joined = _Joined(parts)
            n = _extract(io.BufferedReader(joined), site)
            print(f"extras: {n} files into {site} (probe written {age:.0f} s ago, same boot: {same_boot})")
    print("PYTHONPATH entries: " + ":".join(str(site / d) if d else str(site) for d in manifest["path_dirs"]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="CPU machine: download, stage, compress, split; print the device commands")
    p.add_argument("--without", action="append", default=[], choices=["fa4", "comfy"],
                   help="leave a package group out (repeatable)")
    p.add_argument("--workdir", default=str(ROOT / ".whl"), help="download and archive cache (ignored by git)")
    p.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN / MIB,
                   help="MiB left free in each call for files added before the device run")
    p.add_argument("--preset", type=int, default=9, choices=range(10), help="xz preset (extreme mode on)")
    sub.add_parser("commands", help="CPU machine: re-measure the carry and print the two device commands")
    for name, hlp in (("stash", "device call 1: copy part A to the stash folder and write the probe"),
                      ("unpack", "device call 2: join, check and extract into the site folder")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--carry", default=CARRY_A if name == "stash" else CARRY_B)
        p.add_argument("--stash", default=STASH)
        if name == "unpack":
            p.add_argument("--site", default=SITE)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args)
    if args.cmd == "commands":
        return print_commands()
    return stash(args) if args.cmd == "stash" else unpack(args)


if __name__ == "__main__":
    raise SystemExit(main())
