#!/usr/bin/env bash
# Idempotent setup, sourced by scripts/repro.sh and scripts/test.sh:
#   1. a virtual environment in .venv with the exact versions of requirements/lock-<platform>-<machine>-py<XY>.txt
#      (hash-checked; packages the lock does not name are removed) and this project installed editable;
#      redone only when pyproject.toml or the lock changed since the last install. A lock made for other
#      dependencies than pyproject.toml lists is refused (run scripts/lock.sh). Without a lock for this
#      platform/Python, or with SEMMAE_UNLOCKED=1, it installs the newest releases pyproject.toml allows;
#   2. the Fashion-MNIST idx files of the embedded default (Debian package dataset-fashion-mnist),
#      installed with apt-get when they are missing and apt is usable.
# Environment: PYTHON (default python3), SEMMAE_UNLOCKED=1 (ignore the lock),
# SEMMAE_FMNIST_DIR (default /usr/share/datasets/fashion-mnist),
# SEMMAE_REQUIRE_FMNIST=1 turns a missing dataset into an error instead of a warning.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=${SEMMAE_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}

say() { printf '[setup] %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  say "Python >= 3.10 is needed ('$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)); set PYTHON=/path/to/python3.11"
  exit 1
fi

# the lock for the venv's interpreter (the file name scripts/lock.sh writes), checked before anything is made
py=.venv/bin/python
[ -x "$py" ] || py=$PYTHON
target=$("$py" -c 'import platform, sys; print(f"{sys.platform}-{platform.machine()}-py{sys.version_info[0]}{sys.version_info[1]}")')
lock="requirements/lock-$target.txt"
if [ "${SEMMAE_UNLOCKED:-0}" = 1 ]; then
  mode=unlocked
  say "SEMMAE_UNLOCKED=1: installing the newest releases pyproject.toml allows, not the lock"
elif [ -f "$lock" ]; then
  mode=locked
  if ! "$py" scripts/lock_tools.py check "$lock" pyproject.toml; then
    say "refusing to install an out-of-date lock (message above)"
    exit 1
  fi
else
  mode=unlocked
  say "warning: no lock for $target (there is: $(cd requirements 2>/dev/null && ls lock-*.txt 2>/dev/null | paste -sd' ' || echo none)); installing the newest releases pyproject.toml allows, which is not reproducible. Use PYTHON=/path/to/python3.11 on Linux x86_64, or make a lock for this platform: see scripts/lock.sh"
fi
if [ ! -x .venv/bin/python ]; then
  say "creating virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
want=$( { echo "$mode"; cat pyproject.toml; [ "$mode" = unlocked ] || cat "$lock"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.semmae-installed 2>/dev/null)" != "$want" ]; then
  # torch's CUDA build (what pip resolves on x86_64) takes ~5.5 GB in the venv: say so up front
  # instead of letting pip die half-way through with "No space left on device".
  need_gb=${SEMMAE_SETUP_NEED_GB:-7}
  avail_kb=$(df -Pk .venv | awk 'NR==2 {print $4}')
  if [ -n "$avail_kb" ] && [ "$avail_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    say "only $((avail_kb / 1024 / 1024)) GB free on the filesystem of $PWD/.venv; installing torch (CUDA build) and the rest needs ~${need_gb} GB. Free some space, or clone the project onto a larger disk, and run again."
    exit 1
  fi
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  pipfail() {
    grep -v -e '^WARNING: Location' -e '^Requirement already satisfied' .venv/pip.log | tail -n 40 >&2
    say "$1 (full log: .venv/pip.log)"
    exit 1
  }
  : >.venv/pip.log
  if [ "$mode" = locked ]; then
    say "installing the locked dependencies ($lock) and the project into .venv (a few minutes the first time; log: .venv/pip.log)"
    "${pip[@]}" install --no-cache-dir --require-hashes --no-deps -r "$lock" >>.venv/pip.log 2>&1 \
      || pipfail "pip install -r $lock failed; on a hash mismatch the file pip got differs from the one the lock was made from (or the lock was edited by hand: run scripts/lock.sh)"
    # the build uses the locked setuptools already in .venv: no download, same result every time
    "${pip[@]}" install --no-deps --no-build-isolation -e . >>.venv/pip.log 2>&1 \
      || pipfail "installing the project (pip install --no-deps --no-build-isolation -e .) failed"
    extra=$(.venv/bin/python scripts/lock_tools.py extras "$lock")
    if [ -n "$extra" ]; then
      say "removing packages the lock does not name: $(echo "$extra" | paste -sd' ')"
      "${pip[@]}" uninstall -y $extra >>.venv/pip.log 2>&1 || pipfail "pip uninstall failed"
    fi
    "${pip[@]}" check >>.venv/pip.log 2>&1 \
      || pipfail "pip check found packages whose requirements the lock does not satisfy: run scripts/lock.sh"
  else
    say "installing the project and its dependencies into .venv (a few minutes the first time; log: .venv/pip.log)"
    "${pip[@]}" install --no-cache-dir -e ".[test]" >>.venv/pip.log 2>&1 || pipfail "pip install failed"
  fi
  echo "$want" >.venv/.semmae-installed
else
  say ".venv is up to date${mode:+ ($mode)}"
fi

fmnist_ok() { [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ]; }
if ! fmnist_ok && [ "$FMNIST_DIR" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  apt=""
  if [ "$(id -u)" = 0 ]; then apt="apt-get"; elif sudo -n true 2>/dev/null; then apt="sudo apt-get"; fi
  if [ -n "$apt" ]; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $apt update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $apt install -y -qq dataset-fashion-mnist >/dev/null || true
  fi
fi
if fmnist_ok; then
  say "Fashion-MNIST found in $FMNIST_DIR"
else
  msg="Fashion-MNIST not found in $FMNIST_DIR. Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four idx .gz files of Fashion-MNIST in a directory, export SEMMAE_FMNIST_DIR=<dir> and set prepare.root in params.yaml to it."
  if [ "${SEMMAE_REQUIRE_FMNIST:-0}" = 1 ]; then say "$msg"; exit 1; fi
  say "warning: $msg"
fi
