#!/usr/bin/env bash
# Refresh the dependency lock that scripts/setup.sh installs from:
#   requirements/lock-<sys.platform>-<machine>-py<XY>.txt (shipped: lock-linux-x86_64-py311.txt),
# exact versions of every package that pyproject.toml's dependencies plus the `test` extra pull in,
# each with the sha256 of every file PyPI has for that version (pip then refuses anything else).
#
# When to run it:
#   - after changing [project] dependencies, optional-dependencies or requires-python in pyproject.toml
#     (setup.sh and tests/test_lock.py refuse a lock made for other inputs, and say to run this);
#   - to move to newer releases:  scripts/lock.sh --upgrade                  (everything)
#                                 scripts/lock.sh --upgrade-package timm     (one package)
#     Without --upgrade the versions already in the lock are kept wherever they still fit.
# Then run scripts/setup.sh (it reinstalls because the lock changed), run the tests, and commit the lock.
#
# How: `uv pip compile` (uv pinned below, installed on first use into ~/.cache/semmae-pipeline/) resolves
# against PyPI only, so the lock never depends on a local mirror or wheel store; pip constraint files
# configured on this machine (pip config's `constraint`, PIP_CONSTRAINT) are honoured, because setup.sh's
# pip applies them too and could not install a lock that breaks them (the header lists those applied).
# Hashes: every pin carries them; pip checks whichever copy it installs (PyPI, or a find-links/local
# index whose files are byte-identical to PyPI's, as on the machine this lock was made on).
#
# Another platform or Python: LOCK_PYTHON=3.12 LOCK_PLATFORM=aarch64-manylinux_2_28 scripts/lock.sh
# writes requirements/lock-linux-aarch64-py312.txt, which setup.sh then uses on such a machine.
# LOCK_PLATFORM is a uv target: x86_64-manylinux_2_28, aarch64-manylinux_2_28, aarch64-apple-darwin,
# x86_64-apple-darwin, x86_64-pc-windows-msvc. LOCK_INDEX_URL replaces PyPI (a mirror of it).
# Extra arguments go to `uv pip compile`. Needs python3 (>= 3.9) and network access to the index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV_VERSION=0.13.9
LOCK_PYTHON=${LOCK_PYTHON:-3.11}
LOCK_PLATFORM=${LOCK_PLATFORM:-x86_64-manylinux_2_28}
LOCK_INDEX_URL=${LOCK_INDEX_URL:-https://pypi.org/simple}
PYTHON=${PYTHON:-python3}

say() { printf '[lock] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# the file name setup.sh looks for: <sys.platform>-<platform.machine()>-py<major><minor>
case "$LOCK_PLATFORM" in
  x86_64-manylinux*|x86_64-unknown-linux-gnu|linux) os=linux arch=x86_64 ;;
  aarch64-manylinux*|aarch64-unknown-linux-gnu) os=linux arch=aarch64 ;;
  aarch64-apple-darwin) os=darwin arch=arm64 ;;
  x86_64-apple-darwin) os=darwin arch=x86_64 ;;
  x86_64-pc-windows-msvc|windows) os=win32 arch=AMD64 ;;
  *) die "LOCK_PLATFORM=$LOCK_PLATFORM: not one this script maps to a lock file name (x86_64-manylinux_2_28, aarch64-manylinux_2_28, aarch64-apple-darwin, x86_64-apple-darwin, x86_64-pc-windows-msvc)" ;;
esac
[[ "$LOCK_PYTHON" =~ ^3\.[0-9]+$ ]] || die "LOCK_PYTHON=$LOCK_PYTHON: give major.minor, e.g. 3.11"
lock="requirements/lock-$os-$arch-py${LOCK_PYTHON/./}.txt"

# uv, at the pinned version (its output format is part of the lock's diff)
uv=uv
if [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  tools="${XDG_CACHE_HOME:-$HOME/.cache}/semmae-pipeline/uv-$UV_VERSION"
  uv="$tools/bin/uv"
  if [ ! -x "$uv" ]; then
    say "installing uv $UV_VERSION into $tools"
    "$PYTHON" -m venv "$tools" || die "could not create a virtual environment in $tools with '$PYTHON' (set PYTHON=/path/to/python3)"
    "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" \
      || { rm -rf "$tools"; die "could not install uv==$UV_VERSION from PyPI (see pip's message above)"; }
  fi
fi

# pip constraint files configured here (setup.sh's pip applies them, so the lock must respect them)
constraints=()
for f in $("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.constraint='\(.*\)'$/\1/p") ${PIP_CONSTRAINT:-}; do
  [ -f "$f" ] || die "pip is configured with the constraint file $f, which does not exist"
  case " ${constraints[*]-} " in *" --constraint $f "*) ;; *) constraints+=(--constraint "$f") ;; esac
done

stamp=$("$PYTHON" scripts/lock_tools.py stamp pyproject.toml)
mkdir -p requirements
tmp=$(mktemp "requirements/.lock.XXXXXX")
trap 'rm -f "$tmp" "$tmp.new"' EXIT
[ -f "$lock" ] && cp "$lock" "$tmp"  # uv keeps the versions of its output file unless told to upgrade

# only the index above and the constraints above: no uv settings from the environment
unset UV_INDEX UV_INDEX_URL UV_DEFAULT_INDEX UV_EXTRA_INDEX_URL UV_FIND_LINKS UV_CONSTRAINT UV_OVERRIDE \
  UV_INDEX_STRATEGY UV_PRERELEASE UV_RESOLUTION UV_EXCLUDE_NEWER UV_NO_BUILD_ISOLATION UV_CONFIG_FILE
say "resolving pyproject.toml [test] for Python $LOCK_PYTHON on $LOCK_PLATFORM against $LOCK_INDEX_URL"
"$uv" pip compile pyproject.toml --extra test \
  --python-version "$LOCK_PYTHON" --python-platform "$LOCK_PLATFORM" \
  --index-url "$LOCK_INDEX_URL" --no-config --generate-hashes --no-header \
  ${constraints[@]+"${constraints[@]}"} --quiet -o "$tmp" "$@" \
  || die "uv pip compile failed (message above): fix pyproject.toml's dependencies or the constraints listed, then run again"

{
  echo "# Exact versions of everything pyproject.toml (with the 'test' extra) installs, for Python $LOCK_PYTHON on"
  echo "# $LOCK_PLATFORM. Made by scripts/lock.sh (uv $UV_VERSION, from $LOCK_INDEX_URL); do not edit by hand."
  echo "# Installed by scripts/setup.sh: pip install --require-hashes --no-deps -r <this>, then the project editable."
  for ((i = 1; i < ${#constraints[@]}; i += 2)); do
    echo "# Constraints honoured (${constraints[i]}): $(grep -v '^\s*#' "${constraints[i]}" | grep . | paste -sd' ')"
  done
  echo "# pyproject-deps-sha256: $stamp"
  cat "$tmp"
} >"$tmp.new"
mv "$tmp.new" "$lock"
say "wrote $lock ($(grep -c '^[A-Za-z0-9]' "$lock") packages); now run scripts/setup.sh and the tests, then commit it"
