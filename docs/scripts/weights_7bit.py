#!/usr/bin/env python3
"""
Experiment: requantize the shipped int8 weights to 7 bits (|q| <= 63) after the fact.

With 7-bit weights, ONNX Runtime's u8s8 kernels cannot saturate on x86 without VNNI (two
u8 x s7 products stay below 2^15). This writes, into OUT, the lane and flow models' ORT form
with per-channel 7-bit weights (scale = max|w| / 63 of the dequantized int8 weights, no
retraining), its u8u8 twin, and copies of the QDQ and float models, so that
``docs/scripts/int8_forms.py --models OUT`` compares them:

    .venv/bin/python docs/scripts/weights_7bit.py --out /tmp/w7
    .venv/bin/python docs/scripts/int8_forms.py --frames 24 --models /tmp/w7 --out /tmp/w7out \
        --name w7
"""

import argparse
from pathlib import Path
import shutil

from lane_seg.models.export import _const_value, to_u8u8
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def to_7bit_weights(src, dst) -> int:
    """Requantize every int8 weight tensor of ``src`` to 7 bits per output channel."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == 'Constant'}
    changed = 0
    for node in graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in inits:
            continue
        q8 = numpy_helper.to_array(inits[node.input[0]])
        if q8.dtype != np.int8:
            continue
        scale = np.asarray(_const_value(node.input[1], inits, consts), np.float32)
        shape = [-1] + [1] * (q8.ndim - 1) if scale.ndim == 1 else []
        weights = q8.astype(np.float32) * (scale.reshape(shape) if shape else scale)
        amax = (np.abs(weights).reshape(q8.shape[0], -1).max(1) if shape
                else np.abs(weights).max())
        scale7 = (np.maximum(amax, 1e-12) / 63.0).astype(np.float32)
        q7 = np.clip(np.round(weights / (scale7.reshape(shape) if shape else scale7)), -63, 63)
        tensor = numpy_helper.from_array(q7.astype(np.int8), node.input[0])
        inits[node.input[0]].CopyFrom(tensor)
        name = f'{node.input[0]}_lane_seg_scale7'
        graph.initializer.append(numpy_helper.from_array(scale7.reshape(scale.shape), name))
        node.input[1] = name
        changed += 1
    onnx.save(model, str(dst))
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=str(ROOT / 'models'))
    parser.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    src, out = Path(args.models), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stem in ('lane_unet', 'flow'):
        for form in ('int8_qdq', 'fp32'):
            shutil.copy(src / f'{stem}_{form}.onnx', out)
        count = to_7bit_weights(src / f'{stem}_int8_ort.onnx', out / f'{stem}_int8_ort.onnx')
        to_u8u8(out / f'{stem}_int8_ort.onnx', out / f'{stem}_int8_u8u8.onnx')
        print(f'{stem}: {count} weight tensors at 7 bits')


if __name__ == '__main__':
    main()
