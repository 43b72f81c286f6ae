#!/usr/bin/env bash
# Rebuild the shipped models from scratch on a CPU machine, exactly as they were made
# (2026-11-23 to 2026-12-07, AMD EPYC, 2 cores; about 4 hours of CPU with the default thread
# counts). Run from the repository root after `make venv`. Training seeds:
# 100-211; validation: 900-903; the test set (docs/scripts/evaluate_shipped.sh) uses seeds
# 2000-2003.
set -euo pipefail
# Until 2026-12-05 the trainers' default crop was 128x256; the runs below name it.
BIN=.venv/bin
CACHE=${CACHE:-/work/cache}
RUNS=${RUNS:-/work/runs}
$BIN/python - <<PY
from lane_seg.train.cache import build_cache
build_cache('$CACHE/val', list(range(900, 904)), 25)                       # 384x512 renders
build_cache('$CACHE/train', list(range(100, 140)), 40)                     # 1600 pairs
build_cache('$CACHE/train800', list(range(140, 152)), 16, height=600, width=800)
build_cache('$CACHE/val800', list(range(900, 904)), 12, height=600, width=800)  # 48 pairs
build_cache('$CACHE/train800b', list(range(140, 164)), 16, height=600, width=800)  # 384 pairs
build_cache('$CACHE/train800c', list(range(164, 188)), 16, height=600, width=800)  # 384 pairs
build_cache('$CACHE/train800d', list(range(188, 212)), 16, height=600, width=800)  # 384 pairs
PY
# Lane U-Net: float on 384x512 renders, 8-bit QAT, then both fine-tuned on 800x600 renders.
$BIN/lane-seg train seg --crop 128 256 --data cache:$CACHE/train --val cache:$CACHE/val \
  --out $RUNS/lane_unet_fp32 --epochs 10 --max-train 800 --max-val 50
$BIN/lane-seg train seg --crop 128 256 --init $RUNS/lane_unet_fp32/lane_unet_fp32.safetensors --quant-bits 8 \
  --epochs 2 --max-train 800 --lr 5e-4 --out $RUNS/lane_unet_int8 --max-val 50
$BIN/lane-seg train seg --crop 128 256 --init $RUNS/lane_unet_int8/lane_unet_int8.safetensors \
  --data cache:$CACHE/train800 --epochs 2 --lr 3e-4 --out $RUNS/lane_unet_int8_ft800 --max-val 50
$BIN/lane-seg train seg --crop 128 256 --init $RUNS/lane_unet_fp32/lane_unet_fp32.safetensors \
  --data cache:$CACHE/train800 --epochs 2 --lr 3e-4 --out $RUNS/lane_unet_fp32_ft800 --max-val 20
$BIN/lane-seg export seg --float $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --int8 $RUNS/lane_unet_int8_ft800/lane_unet_int8_ft800.safetensors --out models --name lane_unet
# Flow network: float (8 epochs on 1000 pairs, then 8 more on all 1600); shipped below after
# an 800x600 fine-tune.
$BIN/lane-seg train flow --crop 128 256 --data cache:$CACHE/train --val cache:$CACHE/val \
  --out $RUNS/flow_fp32 --epochs 8 --max-train 1000 --max-val 40 --threads 1
$BIN/lane-seg train flow --crop 128 256 --data cache:$CACHE/train --val cache:$CACHE/val --out $RUNS/flow_fp32b \
  --init $RUNS/flow_fp32/flow_fp32.safetensors --epochs 8 --lr 1e-3 --max-val 40 --threads 1
# Lane U-Net with learned per-layer widths (issue 8; docs/learned_bits.md): model-size loss,
# lambda 0.97, from the float model, 4 epochs on the 800x600 renders; shipped as int8 containers.
$BIN/lane-seg train seg --crop 128 256 --init $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --data cache:$CACHE/train800 --val cache:$CACHE/val --epochs 4 --lr 1e-4 --max-val 50 \
  --quant-bits 8 --learn-bits per_layer --bits-hardware size --bits-lambda 0.97 \
  --bits-every 2 --bits-optimizer adam --bits-lr 0.15 --bits-alpha 4 \
  --out $RUNS/learned_per_layer_size_0.97
$BIN/lane-seg export seg --float $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --int8 $RUNS/learned_per_layer_size_0.97/learned_per_layer_size_0.97.safetensors \
  --out $RUNS/lane_unet_mixed --name lane_unet_mixed
cp $RUNS/lane_unet_mixed/lane_unet_mixed_int8_{qdq,ort,u8u8}.{onnx,json} models/
# Flow network, fine-tuned on the 800x600 renders (4 epochs, lr 1e-4: the float reference of
# the Pareto study, docs/learned_bits.md), then 8-bit PTQ calibrated on the same renders.
$BIN/lane-seg train flow --crop 128 256 --init $RUNS/flow_fp32b/flow_fp32b.safetensors --data cache:$CACHE/train800 \
  --val cache:$CACHE/val --epochs 4 --max-train 800 --lr 1e-4 --max-val 50 --out $RUNS/flow_fp32_ft800
$BIN/lane-seg train flow --crop 128 256 --init $RUNS/flow_fp32_ft800/flow_fp32_ft800.safetensors --quant-bits 8 \
  --epochs 0 --data cache:$CACHE/train800 --out $RUNS/flow_int8_ptq_ft800 --max-val 50
$BIN/lane-seg export flow --float $RUNS/flow_fp32_ft800/flow_fp32_ft800.safetensors \
  --int8 $RUNS/flow_int8_ptq_ft800/flow_int8_ptq_ft800.safetensors --out models --name flow
# 2026-12-05: everything fine-tuned again on whole frames (--crop 256 512: the full model
# input, no crops) rendered at 800x600 (docs/lane_model.md, docs/flow_model.md). Lanes: 20 epochs
# on 384 pairs, 16 on 768, 10 on 1152, then 8-bit PTQ.
$BIN/lane-seg train seg --init $RUNS/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
  --data cache:$CACHE/train800b --val cache:$CACHE/val800 --crop 256 512 --epochs 20 --max-val 48 \
  --lr 1e-3 --out $RUNS/lane_full20
$BIN/lane-seg train seg --init $RUNS/lane_full20/lane_full20.safetensors \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --crop 256 512 \
  --epochs 16 --max-val 48 --lr 6e-4 --out $RUNS/lane_full36
$BIN/lane-seg train seg --init $RUNS/lane_full36/lane_full36.safetensors \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c,cache:$CACHE/train800d \
  --val cache:$CACHE/val800 --crop 256 512 --epochs 10 --max-val 48 --lr 4e-4 --out $RUNS/lane_full46
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors --quant-bits 8 \
  --epochs 0 --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c,cache:$CACHE/train800d \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/lane_full46_ptq
$BIN/lane-seg export seg --float $RUNS/lane_full46/lane_full46.safetensors \
  --int8 $RUNS/lane_full46_ptq/lane_full46_ptq.safetensors --out models --name lane_unet
# Lane U-Net with learned per-layer widths (issue 8, docs/learned_bits.md "Lanes at a longer
# budget"; 2026-12-07, replacing the 96-step model of 2026-12-05): a 192-step search from the
# shipped float model with the size loss at λ 0.97 (seed 0) gives the widths (344 KiB, 2.83-bit
# weights on average); QAT from the float model at those widths, seed 2 (the best
# validation IoU of seeds 0-2), shipped as int8 containers (`--model mixed`). To retrain at the
# shipped widths, give the second command --layer-bits models/lane_unet_mixed_int8_ort.json.
# The 192-step QAT budget of the learned-width studies (both networks; the learning rate is
# given per network) and the width search's settings.
QAT_192="--crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --epochs 2 --max-train 0 --quant-bits 8 \
  --weight-clip mse"
SEARCH="--learn-bits per_layer --bits-hardware size --bits-every 2 --bits-optimizer adam \
  --bits-lr 0.15 --bits-alpha 4"
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors $QAT_192 --lr 1e-4 \
  $SEARCH --bits-lambda 0.97 --seed 0 --out $RUNS/lane_learned_0.97
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors $QAT_192 --lr 1e-4 \
  --layer-bits $RUNS/lane_learned_0.97/lane_learned_0.97.safetensors --seed 2 \
  --out $RUNS/lane_mixed_0.97
$BIN/lane-seg export seg --float $RUNS/lane_full46/lane_full46.safetensors \
  --int8 $RUNS/lane_mixed_0.97/lane_mixed_0.97.safetensors --out $RUNS/lane_unet_mixed \
  --name lane_unet_mixed
cp $RUNS/lane_unet_mixed/lane_unet_mixed_int8_{qdq,ort,u8u8}.{onnx,json} models/
# Flow: 12 epochs on the 768 pairs from the model shipped before, then 8-bit PTQ.
$BIN/lane-seg train flow --init $RUNS/flow_fp32_ft800/flow_fp32_ft800.safetensors \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --crop 256 512 \
  --epochs 12 --lr 5e-4 --max-val 48 --out $RUNS/flow_full12
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 8 \
  --epochs 0 --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/flow_full12_ptq
$BIN/lane-seg export flow --float $RUNS/flow_full12/flow_full12.safetensors \
  --int8 $RUNS/flow_full12_ptq/flow_full12_ptq.safetensors --out models --name flow
# Not shipped: the 4-bit (W4A4) QAT runs of docs/lane_model.md and docs/flow_model.md (targets),
# scored with `lane-seg eval seg|flow --model RUN/RUN.safetensors --data TEST`.
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors --quant-bits 4 --epochs 4 \
  --lr 5e-4 --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/lane_full46_w4a4
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 4 --epochs 4 \
  --lr 3e-4 --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/flow_full12_w4a4
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 4 --act-bits 8 \
  --epochs 2 --lr 3e-4 --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/flow_full12_w4a8
# 2026-12-05 (later session): W4A4 with the low-bit options (unsigned ReLU grids, least-error
# weight steps and activation ranges): test IoU 0.782 vs float 0.822 (was 0.721 without them).
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors --quant-bits 4 \
  --unsigned-relu --weight-clip mse --act-clip mse --epochs 4 --lr 5e-4 --crop 256 512 \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --max-val 48 \
  --out $RUNS/lane_full46_w4a4m
# 2026-12-05 (later session): longer, gentler W4A4 QAT (test IoU 0.783), and the network input
# and stem conv at 8 bits (--first-layer-bits 8): test IoU 0.798 vs float 0.822.
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors --quant-bits 4 \
  --unsigned-relu --weight-clip mse --act-clip mse --epochs 6 --lr 2e-4 --crop 256 512 \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --max-val 48 \
  --out $RUNS/lane_full46_w4a4m6
$BIN/lane-seg train seg --init $RUNS/lane_full46/lane_full46.safetensors --quant-bits 4 \
  --unsigned-relu --weight-clip mse --act-clip mse --first-layer-bits 8 --epochs 6 --lr 2e-4 \
  --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/lane_full46_w4a4f8
# Flow W4A4 with the same options: test EPE 2.77 (every layer at 4 bits), 2.41 with the first
# layer at 8 bits, vs float 1.96.
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 4 \
  --unsigned-relu --weight-clip mse --act-clip mse --epochs 4 --lr 3e-4 --crop 256 512 \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --max-val 48 \
  --out $RUNS/flow_full12_w4a4m
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 4 \
  --unsigned-relu --weight-clip mse --act-clip mse --first-layer-bits 8 --epochs 4 --lr 3e-4 \
  --crop 256 512 --data cache:$CACHE/train800b,cache:$CACHE/train800c \
  --val cache:$CACHE/val800 --max-val 48 --out $RUNS/flow_full12_w4a4f8
# Issue 8, flow at a 192-step budget (docs/learned_bits.md): uniform W5A8 with least-error
# weight steps (test EPE 2.024, 1150 KiB) against learned per-layer widths, size loss, λ 0.97
# (2.044, 1101 KiB).
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 5 \
  --act-bits 8 --weight-clip mse --epochs 2 --lr 3e-4 --crop 256 512 \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --max-val 48 \
  --out $RUNS/flow_full12_w5a8m
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors --quant-bits 8 \
  --learn-bits per_layer --bits-hardware size --bits-lambda 0.97 --bits-optimizer adam \
  --bits-lr 0.15 --bits-every 2 --weight-clip mse --epochs 2 --lr 3e-4 --crop 256 512 \
  --data cache:$CACHE/train800b,cache:$CACHE/train800c --val cache:$CACHE/val800 --max-val 48 \
  --out $RUNS/flow_full12_lb97
# 2026-12-06: flow with learned per-layer widths (issue 8, docs/learned_bits.md "the knee"):
# a 192-step search with the size loss at λ 0.4 (seed 0) gives the widths (556 KiB, 2.42-bit
# weights on average); QAT from the float model at those widths, seed 2 (the best validation
# EPE of seeds 0-4), shipped as int8 containers (`--model mixed`). On other hardware the search
# may settle on other widths: to retrain at the shipped ones, give the second command
# --layer-bits models/flow_mixed_int8_ort.json instead.
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors $QAT_192 --lr 3e-4 \
  $SEARCH --bits-lambda 0.4 --seed 0 --out $RUNS/flow_learned_0.4
$BIN/lane-seg train flow --init $RUNS/flow_full12/flow_full12.safetensors $QAT_192 --lr 3e-4 \
  --layer-bits $RUNS/flow_learned_0.4/flow_learned_0.4.safetensors --seed 2 \
  --out $RUNS/flow_mixed_0.4
$BIN/lane-seg export flow --float $RUNS/flow_full12/flow_full12.safetensors \
  --int8 $RUNS/flow_mixed_0.4/flow_mixed_0.4.safetensors --out $RUNS/flow_mixed --name flow_mixed
cp $RUNS/flow_mixed/flow_mixed_int8_{qdq,ort,u8u8}.{onnx,json} models/
