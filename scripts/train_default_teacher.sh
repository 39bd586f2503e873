#!/usr/bin/env bash
# Regenerate the shipped default teacher, assets/teacher/checkpoint_teacher.pth, with the pipeline's
# own `teacher` stage and the recipe in assets/teacher/params.yaml (iBOT objective, 50 epochs on the
# embedded default's 5,000 prepared Fashion-MNIST images). Needs `dvc repro prepare` first.
# On 2 CPU cores with OMP_NUM_THREADS=1 this took ~1.7 h (~40 img/s); a GPU does it in minutes.
# Bit-identical results need the same hardware and thread count (float reductions differ otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
semmae teacher --params assets/teacher/params.yaml --prepared data/prepared --out "$work/teacher" \
  --metrics "$work/metrics.json" --curves "$work/train_curves.tsv"
cp "$work/teacher/checkpoint_teacher.pth" assets/teacher/checkpoint_teacher.pth
cp "$work/metrics.json" assets/teacher/metrics.json
cp "$work/train_curves.tsv" assets/teacher/train_curves.tsv
echo "wrote assets/teacher/{checkpoint_teacher.pth,metrics.json,train_curves.tsv}" >&2
