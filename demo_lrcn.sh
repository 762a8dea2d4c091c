#!/usr/bin/env bash
# LRCN end to end on real photos, on a CPU, in about a minute on 2 cores with AMX-BF16: Fashion-MNIST products
# moving left, right, up or down (only the frame order tells which) -> both phases -> evaluation
# on held-out clips, and again with each clip's frames shuffled (should fall toward chance, 25%).
#
#   bash demo_lrcn.sh [extra lrcn.py train flags]
#
# Environment: DEMO_DIR (default: runs/demo_lrcn), WEIGHTS (default: the offline VGG16 file in
# ../shared/weights when it exists, else imagenet).
set -euo pipefail
cd "$(dirname "$0")"
DEMO_DIR=${DEMO_DIR:-runs/demo_lrcn}
SHARED_WEIGHTS=../shared/weights/vgg16_notop.weights.h5
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "$SHARED_WEIGHTS" ]; then WEIGHTS=$SHARED_WEIGHTS; else WEIGHTS=imagenet; fi
fi

if [ ! -d "$DEMO_DIR/clips/train" ]; then
  python -m helpers.moving_fashion_mnist "$DEMO_DIR/clips" --train-per-class 100 --eval-per-class 25 --frames 8 --size 64
fi
python lrcn.py train --data-dir "$DEMO_DIR/clips" --output-dir "$DEMO_DIR/run" --frames 8 \
  --weights "$WEIGHTS" --image-size 64 --dense-units 256 --gru-units 128 \
  --epochs 4 --fine-tune-epochs 2 --batch-size 8 --fine-tune-batch-size 8 "$@"
