#!/usr/bin/env bash
# Accuracy of the shipped models on a held-out synthetic test set, against OpenCV for flow.
# Run from the repository root after `make venv`. Writes docs/eval/*.json.
set -euo pipefail
BIN=.venv/bin
TEST=${TEST:-/tmp/lane_seg_testset}
if [ ! -f "$TEST/camera.yaml" ]; then
  # Seeds 2000-2003 are never used in training (training: 100-139, validation: 900-903).
  for i in 0 1 2 3; do
    $BIN/lane-seg sim export --out "$TEST" --frames 25 --seed $((2000 + i)) --start $((i * 100)) \
      --size 600x800 --quiet > /dev/null
  done
fi
mkdir -p docs/eval
for m in int8 fp32 mixed; do   # mixed: learned per-layer widths in int8 containers
  $BIN/lane-seg eval seg --model $m --data "$TEST" --backend onnxruntime --json > docs/eval/seg_$m.json
done
for m in int8 fp32 mixed; do
  $BIN/lane-seg eval flow --model $m --data "$TEST" --backend onnxruntime --json > docs/eval/flow_$m.json
done
for method in dis-ultrafast dis-fast dis-medium farneback; do
  $BIN/lane-seg eval flow --method $method --data "$TEST" --json > docs/eval/flow_$method.json
done
cat docs/eval/*.json
