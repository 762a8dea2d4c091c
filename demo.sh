#!/usr/bin/env bash
# The main job end to end on real photos, on a CPU: 4 minutes on 2 cores with AVX512_BF16, 15 on AVX2 only:
# Fashion-MNIST written in Tiny ImageNet's raw layout -> python -m helpers.restructure_dataset
# (with a labelled 50-per-class holdout) -> both training phases -> evaluation on the holdout.
#
#   bash demo.sh [extra cnn_rnn_classifier.py train flags, e.g. --weights none or --cnn-only]
#
# Environment: DEMO_DIR (default: runs/demo), WEIGHTS (default: the offline Xception file in
# ../shared/weights when it exists, else imagenet).
set -euo pipefail
cd "$(dirname "$0")"
DEMO_DIR=${DEMO_DIR:-runs/demo}
SHARED_WEIGHTS=../shared/weights/xception_imagenet_notop.weights.h5
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "$SHARED_WEIGHTS" ]; then WEIGHTS=$SHARED_WEIGHTS; else WEIGHTS=imagenet; fi
fi

if [ ! -f "$DEMO_DIR/raw/wnids.txt" ]; then
  python -m helpers.fashion_mnist_tiny_imagenet "$DEMO_DIR/raw" --train-per-class 300 --val-per-class 50
fi
python -m helpers.restructure_dataset "$DEMO_DIR/raw" --output "$DEMO_DIR/data" --holdout 50
python cnn_rnn_classifier.py train --data-dir "$DEMO_DIR/data" --output-dir "$DEMO_DIR/run" \
  --weights "$WEIGHTS" --image-size 71 --rnn-timesteps 71 --rnn-units 256 \
  --epochs 3 --fine-tune-epochs 3 --batch-size 32 --fine-tune-batch-size 16 "$@"
