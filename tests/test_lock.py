"""The dependency lock (requirements/lock-*.txt, made by scripts/lock.sh) agrees with pyproject.toml,
and scripts/setup.sh refuses to install one that does not."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

LOCKS = sorted((REPO / "requirements").glob("lock-*.txt"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:[ \t]*\\\n[ \t]+--hash=sha256:[0-9a-f]{64})*)", re.M)
NAME = re.compile(r"lock-(?P<sys_platform>[a-z0-9]+)-(?P<platform_machine>[A-Za-z0-9_]+)-py3(?P<minor>\d+)\.txt")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock) -> dict[str, tuple[str, list[str]]]:
    return {norm(m[1]): (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
            for m in PIN.finditer(lock.read_text(encoding="utf-8"))}


def lock_check(lock, pyproject):
    return subprocess.run([sys.executable, str(REPO / "scripts/lock_tools.py"), "check", str(lock), str(pyproject)],
                          capture_output=True, text=True)


def test_a_lock_ships_for_linux_x86_64_python_3_11():
    assert REPO / "requirements/lock-linux-x86_64-py311.txt" in LOCKS


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_was_made_from_the_current_pyproject(lock):
    res = lock_check(lock, REPO / "pyproject.toml")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_pins_every_requirement_with_an_allowed_version_and_hashes(lock):
    env = NAME.fullmatch(lock.name).groupdict()
    minor = env.pop("minor")
    env |= {"python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    locked = pins(lock)
    assert locked and all(hashes for _, hashes in locked.values()), "every pin needs --hash lines"
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({**env, "extra": "test"}):
            continue
        assert norm(req.name) in locked, f"{lock.name} does not pin {req.name} (pyproject.toml: {text!r})"
        version = locked[norm(req.name)][0]
        assert req.specifier.contains(Version(version), prereleases=True), f"{req.name}=={version} breaks {text!r}"


def test_formatting_and_comments_do_not_stale_the_lock_but_a_dependency_does(tmp_path):
    lock = REPO / "requirements/lock-linux-x86_64-py311.txt"
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    cosmetic = tmp_path / "cosmetic.toml"
    cosmetic.write_text("# a comment\n" + text.replace('"tqdm>=4.66",', '"tqdm>=4.66",   # progress bars'))
    assert lock_check(lock, cosmetic).returncode == 0
    added = tmp_path / "added.toml"
    added.write_text(text.replace('"tqdm>=4.66",', '"tqdm>=4.66", "rich>=13",', 1))
    res = lock_check(lock, added)
    assert res.returncode == 1 and "scripts/lock.sh" in res.stderr and lock.name in res.stderr


def test_setup_refuses_a_stale_lock_before_making_anything(tmp_path):
    target = f"{sys.platform}-{platform.machine()}-py{sys.version_info[0]}{sys.version_info[1]}"
    lock = REPO / f"requirements/lock-{target}.txt"
    if not lock.exists():
        pytest.skip(f"no lock for {target}")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "requirements").mkdir()
    for rel in ("scripts/setup.sh", "scripts/lock_tools.py"):
        shutil.copy(REPO / rel, tmp_path / rel)
    shutil.copy(lock, tmp_path / "requirements" / lock.name)
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(text.replace('"pyyaml>=6",', '"pyyaml>=6.0.1",', 1))
    # were the check missing, setup would stop at the disk check instead (no 6 GB install here)
    env = {**os.environ, "PYTHON": sys.executable, "SEMMAE_SETUP_NEED_GB": "1000000"}
    env.pop("SEMMAE_UNLOCKED", None)
    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert f"requirements/{lock.name}" in res.stderr and "Run scripts/lock.sh" in res.stderr, res.stderr
    assert not (tmp_path / ".venv").exists()
