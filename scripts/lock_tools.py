"""Helpers shared by scripts/lock.sh and scripts/setup.sh for the dependency lock (stdlib only).

  python scripts/lock_tools.py stamp PYPROJECT      print the sha256 of PYPROJECT's dependency inputs
  python scripts/lock_tools.py check LOCK PYPROJECT exit 1 with a message when LOCK was made for other inputs
  python scripts/lock_tools.py extras LOCK          print installed distributions (of this interpreter)
                                                    that LOCK does not pin, except pip and this project

The stamp covers exactly what decides the resolution: [project] requires-python, dependencies and
optional-dependencies, as parsed TOML values (comments and formatting do not count). scripts/lock.sh
writes it into the lock as "# pyproject-deps-sha256: <hex>".

`extras` is written here because pip has no "sync" (uv's `uv pip sync` has, but setup.sh must work with
the plain pip of a fresh venv).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

STAMP_PREFIX = "# pyproject-deps-sha256: "
PROJECT = "semmae-pipeline"
NEVER_LOCKED = {"pip", PROJECT}  # pip comes with the venv; the project is installed editable


def _toml_loads(text: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # Python 3.10: tomli, or the copy pip vendors
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads(text)


def stamp(pyproject: Path) -> str:
    try:
        project = _toml_loads(pyproject.read_text(encoding="utf-8"))["project"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{pyproject}: cannot read its [project] table ({exc})") from None
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def lock_stamp(lock: Path) -> str | None:
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith(STAMP_PREFIX):
            return line[len(STAMP_PREFIX):].strip()
    return None


def check(lock: Path, pyproject: Path) -> int:
    recorded, current = lock_stamp(lock), stamp(pyproject)
    if recorded == current:
        return 0
    why = (f"has no '{STAMP_PREFIX.strip()}' line" if recorded is None else
           f"was made for other dependencies than {pyproject} lists now "
           "([project] dependencies, optional-dependencies or requires-python changed)")
    print(f"{lock} {why}. Run scripts/lock.sh to refresh it (needs PyPI), then run this again; "
          "or set SEMMAE_UNLOCKED=1 to install the newest releases pyproject.toml allows, without the lock.",
          file=sys.stderr)
    return 1


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_names(lock: Path) -> set[str]:
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")
    return {_norm(m.group(1)) for line in lock.read_text(encoding="utf-8").splitlines()
            if (m := pin.match(line))}


def extras(lock: Path) -> list[str]:
    from importlib.metadata import distributions

    keep = locked_names(lock) | NEVER_LOCKED
    installed = {_norm(d.metadata["Name"]) for d in distributions() if d.metadata["Name"]}
    return sorted(installed - keep)


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "stamp" and len(args) == 1:
        print(stamp(Path(args[0])))
        return 0
    if cmd == "check" and len(args) == 2:
        return check(Path(args[0]), Path(args[1]))
    if cmd == "extras" and len(args) == 1:
        print("\n".join(extras(Path(args[0]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
