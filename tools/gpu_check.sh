#!/usr/bin/env bash
# GPU check: does a ResNet-50 train step wait for shardkit, and how fast do the GPU decoders
# decode alone? One script, one GPU box, no network.
#
# On a box with one CUDA GPU and 16 cores (built for the lent H100/H200: Python 3.12,
# PyTorch + torchvision with CUDA 13, no network), from the repository root:
#
#   bash tools/gpu_check.sh                 # ~5-7 minutes (ends within 420 s: --deadline)
#   bash tools/gpu_check.sh --only ceiling,shardkit-gpu-torchcodec --steps 30
#   bash tools/gpu_check.sh --smoke         # the whole script, tiny, on the CPU (a minute)
#
# With OUT set, results go to $OUT/gpu_check.json and $OUT/gpu_check.md (rewritten after each
# configuration, so a run cut short keeps what it measured) and the log to $OUT/gpu_check.log.
#
# It generates 20,000 photo-like JPEGs (~500x375) and their shards under /tmp, then runs a
# torchvision ResNet-50 (random init, channels-last, bf16 autocast, batch 256) for a fixed
# number of steps after a warm-up, fed by: (a) a batch already on the GPU (the ceiling),
# (b) ShardLoader decoding in 15 workers, (c) webdataset with 15 workers, (d) ShardLoader
# with decode_device="cuda" for each GPU decoder (TorchCodec; nvImageCodec 0.8 and 0.9);
# then each GPU decoder alone (no model, 4 workers), and a probe of each nvImageCodec
# version's batched region decoding on this card (0.9.0 is reported to crash in it:
# NVIDIA/nvImageCodec issue 55; the probe runs in its own process). For each: img/s, the
# GPU idle fraction (seconds waiting for data / total) and the CPU cores used, plus the
# card, driver and package versions. See tools/gpu_check.py.
#
# The box has PyTorch, torchvision, numpy, pillow, pyyaml and tqdm but cannot download, so
# shardkit's other dependencies, webdataset, TorchCodec and nvImageCodec travel as wheels in
# .whl/ (not committed): the shared ones in .whl/, each nvImageCodec version in
# .whl/nvimgcodec-VER/ (installed into its own folder: two versions of one package cannot
# share one). Prepare them once where pip reaches PyPI, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude        # (a worktree: $(git rev-parse --git-path info/exclude))
#   python3 tools/gpu_check.py --prepare-wheels .whl      # --wheel-cuda 12 for a CUDA 12 PyTorch
#
# which runs these downloads (then drops from the nvImageCodec wheels the builds for other
# Pythons and the JPEG 2000/TIFF/OpenCV extensions: ~25 MiB in all instead of ~70, under the
# device tool's 64 MiB):
#
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   python3 -m pip download $P -d .whl webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 \
#     google-crc32c==1.9.0 torchcodec==0.17.0 nvidia-nvjpeg==13.3.2.43
#   python3 -m pip download $P -d .whl/nvimgcodec-0.8 nvidia-nvimgcodec-cu13==0.8.0.22
#   python3 -m pip download $P -d .whl/nvimgcodec-0.9 nvidia-nvimgcodec-cu13==0.9.0.20
#
# (CUDA 12 PyTorch: nvidia-nvjpeg-cu12==12.4.0.76 and nvidia-nvimgcodec-cu12, and TorchCodec
# from PyTorch's cu12x wheel index: the PyPI torchcodec is built for CUDA 13.) With the device
# tool, carry .whl: run(command="bash tools/gpu_check.sh", carry=[".whl"]). Without .whl/ the
# script uses whatever is installed; a configuration whose package is missing is reported
# as skipped or failed, the others still run. nvImageCodec logs "[ERROR] ... nvJPEG2000 /
# nvTIFF" at import when those extensions are absent: harmless, only JPEG is decoded here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
SITE=/tmp/shardkit-gpu-check-site
args=()
add_libs() {  # nvImageCodec's JPEG extension dlopens libnvjpeg, which the nvidia-nvjpeg wheel puts here
  for lib in "$1"/nvidia/cu1*/lib "$1"/nvidia/nvjpeg/lib; do  # CUDA 13, CUDA 12 wheels
    if [ -d "$lib" ]; then export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  done
}
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE (no network)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  add_libs "$SITE"
fi
for folder in .whl/nvimgcodec-*/; do
  [ -d "$folder" ] && compgen -G "$folder*.whl" >/dev/null || continue
  version=$(basename "$folder"); version=${version#nvimgcodec-}
  target="$SITE-nvimgcodec-$version"
  echo "installing nvImageCodec $version into $target"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$folder"*.whl
  args+=(--nvimgcodec "$version=$target")
done
# shardkit itself runs from this checkout (tools/gpu_check.py puts it on sys.path).
export PYTHONUNBUFFERED=1
args+=("$@")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  args+=(--json "$OUT/gpu_check.json" --markdown "$OUT/gpu_check.md")
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$PY" tools/gpu_check.py "${args[@]}"
