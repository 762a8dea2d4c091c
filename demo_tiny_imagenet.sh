#!/usr/bin/env bash
# The main job on the seed's own dataset, end to end on a CPU (23 minutes on 2 cores with AMX-BF16, about
# 2 h 10 min on AVX2 only, summed from its stages):
# tiny-imagenet-100 (the first 100 classes of Tiny ImageNet-200, raw download layout)
# -> python -m helpers.restructure_dataset --holdout 50 (5,000 labelled held-out images, hard links,
# no copies) -> phase 1 on cached Xception features -> phase 2 fine-tuning Xception's blocks 10-14
# -> evaluation on the holdout and the report (top-1, top-5, per class, confusion matrix, weakest classes).
#
#   bash demo_tiny_imagenet.sh [extra cnn_rnn_classifier.py train flags, e.g. --cnn-only or --augment]
#
# Environment: TINY_IMAGENET (default: ../shared/tiny-imagenet-100), DEMO_DIR (default:
# runs/tiny-imagenet), WEIGHTS (default: the offline Xception file in ../shared/weights when it
# exists, else imagenet).
#
# The CPU configuration (README, "tiny-imagenet-100 end to end"): 128 px (the 64 px photos upsampled
# 2x: Xception's features are much better there than at 72 px, and 128 px costs a quarter of 256 px),
# the grayscale image as 32 timesteps of 512 pixels into two LSTM(256) (the seed's 2048 units cost
# 8x more per step), 3 epochs of phase 1 (RMSprop 1e-3; validation loss is lowest by then) and one
# of phase 2 (Adam 1e-4, Xception's top 46 layers, bfloat16 Xception where the CPU has AMX/AVX512_BF16).
set -euo pipefail
cd "$(dirname "$0")"
TINY_IMAGENET=${TINY_IMAGENET:-../shared/tiny-imagenet-100}
DEMO_DIR=${DEMO_DIR:-runs/tiny-imagenet}
SHARED_WEIGHTS=../shared/weights/xception_imagenet_notop.weights.h5
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "$SHARED_WEIGHTS" ]; then WEIGHTS=$SHARED_WEIGHTS; else WEIGHTS=imagenet; fi
fi

python -m helpers.restructure_dataset "$TINY_IMAGENET" --output "$DEMO_DIR/data" --holdout 50
python cnn_rnn_classifier.py train --data-dir "$DEMO_DIR/data" --output-dir "$DEMO_DIR/run" \
  --weights "$WEIGHTS" --image-size 128 --rnn-timesteps 32 --rnn-units 256 \
  --epochs 3 --fine-tune-epochs 1 --batch-size 32 --fine-tune-batch-size 32 --fine-tune-layers 46 "$@"
