"""
The U-Net family on 2 CPU cores: parameters, MACs and ONNX Runtime latency at 256x512.

Run from the repository root::

    .venv/bin/python docs/scripts/family_study.py --out docs/studies/family

Each model is exported (random weights: latency does not depend on them) as float ONNX and as
int8 (the ONNX Runtime form); latency is the median of ``--runs`` runs after 3 warm-ups with 2
intra-op threads. Writes ``results.json`` and ``table.md``.
"""

import argparse
import json
import os
from pathlib import Path
import platform
import tempfile
import time

import numpy as np

FAMILY = [
    ('classic-4', {'levels': 4, 'base': 64, 'variant': 'classic'}),
    ('classic-3', {'levels': 3, 'base': 64, 'variant': 'classic'}),
    ('classic-2', {'levels': 2, 'base': 64, 'variant': 'classic'}),
    ('classic-1', {'levels': 1, 'base': 64, 'variant': 'classic'}),
    ('fast-3-24 (shipped)', {'levels': 3, 'base': 24, 'variant': 'fast', 'separable': False}),
    ('fast-3-16', {'levels': 3, 'base': 16, 'variant': 'fast', 'separable': False}),
    ('fast-3-16-separable', {'levels': 3, 'base': 16, 'variant': 'fast', 'separable': True}),
]


def latency(path, runs, shape):
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main():
    import torch
    from lane_seg.models.export import export_onnx, to_ort_int8
    from lane_seg.models.layers import count_macs, count_parameters
    from lane_seg.models.quant import calibrate, freeze_for_export, quantize_model, QuantConfig
    from lane_seg.models.unet import UNet, UNetConfig
    from lane_seg.train.seg import lane_metadata, SegTrainConfig
    p = argparse.ArgumentParser()
    p.add_argument('--out', default='docs/studies/family')
    p.add_argument('--runs', type=int, default=10)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    shape = (1, 3, 256, 512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in FAMILY:
            cfg = SegTrainConfig(arch=dict(arch))
            model = UNet(UNetConfig(**arch)).eval()
            row = {'model': name, 'config': arch, 'params': count_parameters(model),
                   'gmacs': round(count_macs(model, shape) / 1e9, 3)}
            meta = lane_metadata(cfg, name)
            fp32 = Path(tmp) / 'fp32.onnx'
            export_onnx(model, meta, fp32)
            row['fp32_ms'] = round(latency(fp32, a.runs, shape), 2)
            qcfg = dict(cfg.__dict__, quant_bits=8, act_bits=8)
            qmeta = lane_metadata(SegTrainConfig(**qcfg), name)
            qmodel = quantize_model(model, QuantConfig())
            calibrate(qmodel, [torch.randn(*shape)])
            freeze_for_export(qmodel)
            qdq = Path(tmp) / 'qdq.onnx'
            export_onnx(qmodel, qmeta, qdq)
            ort8 = Path(tmp) / 'ort.onnx'
            to_ort_int8(qdq, ort8)
            row['int8_ms'] = round(latency(ort8, a.runs, shape), 2)
            row['speedup'] = round(row['fp32_ms'] / row['int8_ms'], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {'cpu': platform.processor() or 'see /proc/cpuinfo', 'cores': os.cpu_count(),
               'python': platform.python_version()}
    (out / 'results.json').write_text(json.dumps({'machine': machine, 'input': shape,
                                                  'rows': rows}, indent=2) + '\n')
    lines = ['| model | params | GMACs | fp32 ms | int8 ms | int8 speed-up |',
             '|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['gmacs']} | "
                     f"{r['fp32_ms']} | {r['int8_ms']} | {r['speedup']}x |")
    (out / 'table.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
