#!/usr/bin/env bash
# GPU check: does a ResNet-50 train step wait for shardkit? One script, one GPU box, no network.
#
# On a box with one CUDA GPU and 16 cores (built for the lent H100/H200: Python 3.12,
# PyTorch + torchvision with CUDA 13, no network), from the repository root:
#
#   bash tools/gpu_check.sh                 # ~5-7 minutes; JSON into $OUT/gpu_check.json when OUT is set
#   bash tools/gpu_check.sh --only ceiling,shardkit-gpu-nvjpeg --steps 30
#
# It generates 20,000 photo-like JPEGs (~500x375) and their shards under /tmp, then runs a
# torchvision ResNet-50 (random init, channels-last, bf16 autocast, batch 256) for a fixed
# number of steps after a warm-up, fed by: (a) a batch already on the GPU (the ceiling),
# (b) ShardLoader decoding in 15 workers, (c) webdataset with 15 workers, (d) ShardLoader
# with decode_device="cuda" (nvImageCodec, then torchvision's nvjpeg). For each it prints
# img/s and the GPU idle fraction (seconds waiting for data / total). See tools/gpu_check.py.
#
# The box has PyTorch, torchvision, numpy, pillow, pyyaml and tqdm but cannot download, so
# shardkit's other dependencies, webdataset and nvImageCodec travel as wheels in .whl/
# (not committed). Prepare them once on a machine with pip and network, in the repository
# root (Python 3.12, x86-64; cu13 matches the box's PyTorch 2.11+cu130, use
# nvidia-nvimgcodec-cu12 and nvidia-nvjpeg-cu12 instead on a CUDA 12 build):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 google-crc32c==1.9.0 \
#     nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
#
# (29 MB together.) With the device tool, carry .whl: run(command="bash tools/gpu_check.sh",
# carry=[".whl"]). Without .whl/ the script uses whatever is installed; a configuration
# whose package is missing is reported as skipped or failed, the others still run.
# nvImageCodec logs "[ERROR] ... nvJPEG2000 / nvTIFF" at import when those optional wheels
# are absent: harmless here, only JPEG is decoded on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
SITE=/tmp/shardkit-gpu-check-site
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE (no network)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # nvImageCodec's JPEG extension dlopens libnvjpeg, which the nvidia-nvjpeg wheel puts here.
  for lib in "$SITE"/nvidia/cu1*/lib; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
# shardkit itself runs from this checkout (tools/gpu_check.py puts it on sys.path).
export PYTHONUNBUFFERED=1
args=("$@")
if [ -n "${OUT:-}" ]; then
  args+=(--json "$OUT/gpu_check.json")
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" tools/gpu_check.py "${args[@]}"
