#!/usr/bin/env bash
# Rebuild the shipped models from scratch on a CPU machine, exactly as they were made
# (2026-11-23, AMD EPYC, 2 cores; about 2 hours of CPU with the default thread counts).
# Run from the repository root after `make venv`. Training seeds: 100-151; validation: 900-903;
# the test set (docs/scripts/evaluate_shipped.sh) uses seeds 2000-2003.
set -euo pipefail
BIN=.venv/bin
CACHE=${CACHE:-/work/cache}
RUNS=${RUNS:-/work/runs}
$BIN/python - <<PY
from lane_seg.train.cache import build_cache
build_cache('$CACHE/val', list(range(900, 904)), 25)                       # 384x512 renders
build_cache('$CACHE/train', list(range(100, 140)), 40)                     # 1600 pairs
build_cache('$CACHE/train800', list(range(140, 152)), 16, height=600, width=800)
PY
# Lane U-Net: float on 384x512 renders, 8-bit QAT, then both fine-tuned on 800x600 renders.
$BIN/lane-seg train seg --data cache:$CACHE/train --val cache:$CACHE/val \
  --out $RUNS/lane_unet_fp32 --epochs 10 --max-train 800 --max-val 50
$BIN/lane-seg train seg --init $RUNS/lane_unet_fp32/lane_unet_fp32.safetensors --quant-bits 8 \
  --epochs 2 --max-train 800 --lr 5e-4 --out $RUNS/lane_unet_int8 --max-val 50
$BIN/lane-seg train seg --init $RUNS/lane_unet_int8/lane_unet_int8.safetensors \
  --data cache:$CACHE/train800 --epochs 2 --lr 3e-4 --out $RUNS/lane_unet_int8_ft800 --max-val 50
$BIN/lane-seg train seg --init $RUNS/lane_unet_fp32/lane_unet_fp32.safetensors \
  --data cache:$CACHE/train800 --epochs 2 --lr 3e-4 --out $RUNS/lane_unet_fp32_ft800 --max-val 20
$BIN/lane-seg export seg --float $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --int8 $RUNS/lane_unet_int8_ft800/lane_unet_int8_ft800.safetensors --out models --name lane_unet
# Flow network: float (8 epochs on 1000 pairs, then 8 more on all 1600); shipped below after
# an 800x600 fine-tune.
$BIN/lane-seg train flow --data cache:$CACHE/train --val cache:$CACHE/val \
  --out $RUNS/flow_fp32 --epochs 8 --max-train 1000 --max-val 40 --threads 1
$BIN/lane-seg train flow --data cache:$CACHE/train --val cache:$CACHE/val --out $RUNS/flow_fp32b \
  --init $RUNS/flow_fp32/flow_fp32.safetensors --epochs 8 --lr 1e-3 --max-val 40 --threads 1
# Lane U-Net with learned per-layer widths (issue 8; docs/learned_bits.md): model-size loss,
# lambda 0.97, from the float model, 4 epochs on the 800x600 renders; shipped as int8 containers.
$BIN/lane-seg train seg --init $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --data cache:$CACHE/train800 --val cache:$CACHE/val --epochs 4 --lr 1e-4 --max-val 50 \
  --quant-bits 8 --learn-bits per_layer --bits-hardware size --bits-lambda 0.97 \
  --bits-every 2 --bits-optimizer adam --bits-lr 0.15 --bits-alpha 4 \
  --out $RUNS/learned_per_layer_size_0.97
$BIN/lane-seg export seg --float $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --int8 $RUNS/learned_per_layer_size_0.97/learned_per_layer_size_0.97.safetensors \
  --out $RUNS/lane_unet_mixed --name lane_unet_mixed
cp $RUNS/lane_unet_mixed/lane_unet_mixed_int8_{qdq,ort}.{onnx,json} models/
# Flow network, fine-tuned on the 800x600 renders (4 epochs, lr 1e-4: the float reference of
# the Pareto study, docs/learned_bits.md), then 8-bit PTQ calibrated on the same renders.
$BIN/lane-seg train flow --init $RUNS/flow_fp32b/flow_fp32b.safetensors --data cache:$CACHE/train800 \
  --val cache:$CACHE/val --epochs 4 --max-train 800 --lr 1e-4 --max-val 50 --out $RUNS/flow_fp32_ft800
$BIN/lane-seg train flow --init $RUNS/flow_fp32_ft800/flow_fp32_ft800.safetensors --quant-bits 8 \
  --epochs 0 --data cache:$CACHE/train800 --out $RUNS/flow_int8_ptq_ft800 --max-val 50
$BIN/lane-seg export flow --float $RUNS/flow_fp32_ft800/flow_fp32_ft800.safetensors \
  --int8 $RUNS/flow_int8_ptq_ft800/flow_int8_ptq_ft800.safetensors --out models --name flow
