"""The notebook's offline install: a wheels folder for Kaggle's platform, filled here, installed there with no index
and no dependency resolution (so pip can neither reach the network nor replace Kaggle's own torch).

    python -m kit.offline download WHEELS   # here, online: every wheel of requirements-offline.txt
    python -m kit.offline install WHEELS    # there, offline: what the notebook's install cell runs

Torch-free: it runs before the packages it installs are importable.
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kit.weights import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements-offline.txt"
PYTHONS = ("3.12", "3.11")  # Kaggle's image runs 3.12 (since Dec 2025); 3.11 is this kit's and older images'
GLIBC_MINOR = 35  # Kaggle's image is Ubuntu 22.04 or newer (glibc >= 2.35): wheels that need no more


def platforms(glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """Every manylinux x86_64 tag a glibc 2.`glibc_minor` system runs: pip does not widen `manylinux_2_X` tags
    to older ones by itself, so each is named."""
    return [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 16, -1)] + ["manylinux2014_x86_64"]


def download_command(dest: Path, python: str, requirements: Path = REQUIREMENTS) -> list[str]:
    """`pip download` of exactly the listed wheels (no dependencies, no sdists) for CPython `python` on Linux."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--implementation", "cp", "--python-version", python]
    for tag in platforms():
        command += ["--platform", tag]
    return command + ["-r", str(requirements), "-d", str(dest)]


def install_command(wheels: Sequence[Path], requirements: Path = REQUIREMENTS) -> list[str]:
    """`pip install` with no index and no resolution: what is installed at the pinned version already stays, the
    rest comes from the `wheels` folders."""
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    for folder in wheels:
        command += ["--find-links", str(folder)]
    return command + ["-r", str(requirements)]


def canonical(name: str) -> str:
    """A package name as pip compares it (PEP 503): case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """Canonical name -> pinned version of each `name==version` line of a requirements file (by hand, not with
    `packaging`: this runs before anything is installed)."""
    found = {}
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*(\S+)", line.split("#", 1)[0].strip())
        if match:
            found[canonical(match[1])] = match[2]
    return found


def download(dest: Path, pythons: Sequence[str] = PYTHONS, requirements: Path = REQUIREMENTS) -> None:
    """Fill `dest` with the wheels of `requirements` for each Python (pure wheels are fetched once)."""
    dest.mkdir(parents=True, exist_ok=True)
    for python in pythons:
        subprocess.run(download_command(dest, python, requirements), check=True)


def install(wheels: Sequence[Path], requirements: Path = REQUIREMENTS,
            log: Callable[[str], None] = print) -> list[str]:
    """Install `requirements` offline from the `wheels` folders, then return (and log) what `pip check` finds wrong
    with the listed packages under the image's own (--no-deps checked nothing: a torch outside unsloth's range
    shows up here). No folder: nothing is installed, the image's packages are used as they are (a machine that
    already has the stack, like the notebook's test)."""
    if not wheels:
        log("no wheels folder attached: nothing installed, the image's packages are used as they are")
        return []
    subprocess.run(install_command(wheels, requirements), check=True)
    importlib.invalidate_caches()
    listed = pins(requirements)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if canonical(line.split(" ", 1)[0]) in listed]
    for line in problems:
        log(f"warning: {line}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit.offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fill a wheels folder for Kaggle (needs the package index)")
    get.add_argument("dest", type=Path, metavar="WHEELS")
    get.add_argument("--python", nargs="+", default=list(PYTHONS), metavar="X.Y",
                     help=f"CPython versions to fetch wheels for (default: {' '.join(PYTHONS)})")
    put = commands.add_parser("install", help="install from a wheels folder, offline")
    put.add_argument("wheels", type=Path, nargs="+", metavar="WHEELS")
    for sub in (get, put):
        sub.add_argument("--requirements", type=Path, default=REQUIREMENTS, metavar="FILE")
    args = p.parse_args(argv)
    if args.command == "download":
        download(args.dest, args.python, args.requirements)
    else:
        install(args.wheels, args.requirements)
    return 0


if __name__ == "__main__":
    sys.exit(main())
