#!/usr/bin/env bash
# Every GPU check in one run, for a short session on a GPU machine: the bf16 ViT-B/16 train
# step with semantic and random masking (eager and compiled), the loader with nvJPEG decode, the
# masking cost, the pretrain stage end to end with decode: device, and a torchrun smoke of it. Prints
# JSON lines; with OUT set, also writes them to $OUT/gpu_checks.jsonl. SMOKE_ONLY=1 runs only the
# last two (they run on a CPU too).
#
# On a GPU machine that has torch, timm, pyarrow, typer and pillow but not webdataset or dvc (and no
# network), bring the wheels of webdataset and its needs (braceexpand) in .whl, then from
# the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
log="${OUT:-/tmp}/gpu_checks.jsonl"
run() { echo "== $*" >&2; timeout 240 "$@" | tail -1 | tee -a "$log"; }

if [[ -z "${SMOKE_ONLY:-}" ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2
  run python3 benchmarks/train_step.py --batch 256 --steps 20
  run python3 benchmarks/train_step.py --batch 256 --steps 20 --compile
  run python3 benchmarks/loader_throughput.py --images 2048 --workers "$(nproc)" --batch 256
  run python3 benchmarks/masking_cost.py
fi

# pretrain end to end on ImageNet-sized JPEGs (decode: device; bf16 on a GPU), then 2 torchrun
# processes on CPU ranks (gloo: one GPU cannot host two nccl ranks), the launcher path
tmp=$(mktemp -d)
python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from loader_throughput import synthetic_jpegs, write_sets
write_sets(synthetic_jpegs(${SMOKE_IMAGES:-1088}), Path('$tmp'), shard_size=64, val=64)" >&2
cat > "$tmp/params.yaml" <<'YAML'
pretrain:
  seeds: [0]
  common: {img_size: 224, patch_size: 16, epochs: 2, batch_size: 64, loader_streams: 4, num_workers: 2,
           decode: device, shuffle_buffer: 128, num_figure_images: 4}
  variants: {semantic: {masking: semantic}}
YAML
args=(pretrain --params params.yaml --variant semantic --part-shards part_shards --resume resume --figures fig)
(cd "$tmp" && timeout 300 python3 -m stages.cli "${args[@]}" --out o1 --metrics m1.json --curves c1.tsv >&2 &&
  python3 -c "import json; print(json.dumps({'pretrain_stage': json.load(open('m1.json'))}))" | tee -a "$log")
(cd "$tmp" && CUDA_VISIBLE_DEVICES='' timeout 300 torchrun --standalone --nproc_per_node=2 -m stages.cli "${args[@]}" \
  --out o2 --metrics m2.json --curves c2.tsv >&2 &&
  python3 -c "import json; print(json.dumps({'pretrain_torchrun_2_cpu': json.load(open('m2.json'))}))" | tee -a "$log")
