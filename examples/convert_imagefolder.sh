#!/usr/bin/env bash
# Convert an ImageFolder tree into tar shards, check them, and train on them.
#
# What it shows, end to end with the command line:
#   1. an ImageFolder (class_XX/*.jpg) -- generated here with shardkit.cli.synthetic unless
#      you pass your own folder;
#   2. `shardkit write SRC DEST`: size-bounded shards + .idx sidecars + a manifest
#      (sample counts and class names, which ShardDataset reads for exact splits);
#   3. `shardkit verify`: parses every shard and checks it against manifest and indexes;
#   4. a short training run on the shards (examples/train_classifier.py --data DEST).
#
# Run (CPU, < 1 minute):
#   bash examples/convert_imagefolder.sh                 # generated images, temp dir
#   bash examples/convert_imagefolder.sh ./my_imagefolder ./my_shards
# Environment knobs: COUNT (generated images, default 300), SHARD_SIZE (default 200k),
# TRAIN_ARGS (extra arguments for train_classifier.py, default "--epochs 1").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
COUNT="${COUNT:-300}"
SHARD_SIZE="${SHARD_SIZE:-200k}"
TRAIN_ARGS="${TRAIN_ARGS:---epochs 1}"
# `shardkit` below is the CLI of this checkout (the same as the installed `shardkit`
# command, but it also works without `pip install`).
PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
shardkit() { "$PYTHON" -m shardkit.cli "$@"; }

WORK="$(mktemp -d -t shardkit-convert-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

SRC="${1:-}"
DEST="${2:-$WORK/shards}"
if [[ -z "$SRC" ]]; then
    SRC="$WORK/images"
    echo "== generating $COUNT photo-like JPEGs in $SRC"
    "$PYTHON" -c "import sys; from shardkit.cli.synthetic import make_image_folder; \
make_image_folder(sys.argv[1], count=int(sys.argv[2]), classes=4, size=(96, 72))" "$SRC" "$COUNT"
fi

echo "== shardkit write $SRC $DEST"
shardkit write "$SRC" "$DEST" --shard-size "$SHARD_SIZE" --shuffle --overwrite

echo "== shardkit verify $DEST"
shardkit verify "$DEST" --decode

echo "== training on the shards"
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of words on purpose
"$PYTHON" "$HERE/train_classifier.py" --data "$DEST" $TRAIN_ARGS
