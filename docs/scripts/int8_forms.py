#!/usr/bin/env python3
"""
ONNX Runtime's int8 forms of the shipped models on this CPU: speed and exactness.

For each task, runs the signed QDQ model (``*_int8_qdq.onnx``), the u8s8 form
(``*_int8_ort.onnx``), the u8u8 form (``*_int8_u8u8.onnx``) and the float model through the
real pipelines on the synthetic drive (1 engine thread): inference time per frame, the task's
accuracy against the drive's exact ground truth (lane IoU, flow EPE), and how far each int8
form's raw output is from its own graph's semantics (the same file run by ONNX Runtime with
graph optimizations off, i.e. float Q/DQ arithmetic), in steps of 1/127 of that output's
largest magnitude.

    .venv/bin/python docs/scripts/int8_forms.py --frames 24 --out docs/bench --name int8_forms_NAME
"""

import argparse
import json
import os
from pathlib import Path
import platform
import sys

from lane_seg.engines import load_engine
from lane_seg.engines.int8_kernels import int8_kernels
from lane_seg.pipeline.flow import FlowPipeline
from lane_seg.pipeline.lanes import LanePipeline
from lane_seg.sim.drive import DriveConfig, SyntheticDrive
import numpy as np

ROOT = Path(__file__).resolve().parents[2]

STEMS = {'lanes': 'lane_unet', 'flow': 'flow'}
FORMS = (('qdq', 'int8_qdq', None), ('u8s8', 'int8_ort', 'u8s8'),
         ('u8u8', 'int8_u8u8', 'u8u8'), ('fp32', 'fp32', None))


def cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def reference(path, inputs):
    """Run the QDQ graph as written: ONNX Runtime with every graph optimization off."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x})[0] for x in inputs]


class Recorder:
    """Wrap an engine: keep each input and output the pipeline passes through it."""

    def __init__(self, engine):
        self.engine, self.inputs, self.outputs = engine, [], []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def infer(self, inputs):
        out = self.engine.infer(inputs)
        self.inputs.append(next(iter(inputs.values())).copy())
        self.outputs.append(next(iter(out.values())).copy())
        return out


def load_as_is(path, kernels):
    """Load ``path`` on ONNX Runtime with ``kernels`` forced, so that no sibling replaces it."""
    saved = os.environ.get('LANE_SEG_INT8_KERNELS')
    os.environ['LANE_SEG_INT8_KERNELS'] = kernels or 'u8s8'
    try:
        return load_engine(path, backend='onnxruntime', threads=1)
    finally:
        if saved is None:
            del os.environ['LANE_SEG_INT8_KERNELS']
        else:
            os.environ['LANE_SEG_INT8_KERNELS'] = saved


def run_form(task, path, kernels, frames):
    engine = Recorder(load_as_is(path, kernels))
    assert Path(engine.source).name == path.name, (engine.source, path)
    times, scores = [], []
    if task == 'lanes':
        pipe = LanePipeline(engine, model=path)
        for f in frames:
            r = pipe(f.image, 'bgr8')
            times.append(r.timings['inference'])
            gt, m = f.lane_binary > 0, r.mask > 0
            scores.append((m & gt).sum() / max(1, (m | gt).sum()))
    else:
        pipe = FlowPipeline(engine, model=path)
        prev = None
        for f in frames:
            r = pipe(f.image, 'bgr8', f.stamp)
            if r is not None and prev is not None:
                times.append(r.timings['inference'])
                err = np.linalg.norm(r.flow - prev.flow, axis=-1)[prev.flow_valid]
                scores.append(float(err.mean()))
            prev = f
    timed = times[2:] or times
    return engine, {'file': path.name, 'inference_ms_p50': round(float(np.median(timed)), 2),
                    'inference_ms_p95': round(float(np.percentile(timed, 95)), 2),
                    ('iou' if task == 'lanes' else 'epe_px'): round(float(np.mean(scores)), 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=24)
    parser.add_argument('--seed', type=int, default=3)
    parser.add_argument('--models', default=str(ROOT / 'models'))
    parser.add_argument('--out', default='docs/bench')
    parser.add_argument('--name', default='int8_forms')
    args = parser.parse_args(argv)
    drive = SyntheticDrive(DriveConfig.sized(args.seed, 600, 800))
    frames = list(drive.frames(args.frames))
    chosen = int8_kernels({})
    report = {'machine': {'cpu': cpu_name(), 'cpus': os.cpu_count(),
                          'int8_kernels_chosen': list(chosen),
                          'python': platform.python_version()},
              'command': 'docs/scripts/int8_forms.py ' + ' '.join(argv or sys.argv[1:]),
              'frames': args.frames, 'seed': args.seed, 'size': [600, 800], 'tasks': {}}
    for task, stem in STEMS.items():
        rows = {}
        for label, form, kernels in FORMS:
            path = Path(args.models) / f'{stem}_{form}.onnx'
            engine, row = run_form(task, path, kernels, frames)
            if label != 'fp32':   # against the same graph run as written (float Q/DQ)
                ref = reference(path, engine.inputs)
                steps = np.concatenate([(np.abs(o - r) / (np.abs(r).max() / 127.0)).ravel()
                                        for o, r in zip(engine.outputs, ref)])
                row['steps_from_graph_semantics_max'] = round(float(steps.max()), 2)
                row['within_one_step'] = round(float(np.mean(steps <= 1.0)), 5)
            engine.close()
            rows[label] = row
            print(task, label, json.dumps(row), flush=True)
        report['tasks'][task] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{args.name}.json').write_text(json.dumps(report, indent=1) + '\n')
    lines = [f'# ONNX Runtime int8 forms on {report["machine"]["cpu"]}', '',
             f'Chosen by the engine here: {chosen[0]} ({chosen[1]}). Command: '
             f'`.venv/bin/python {report["command"]}`; {args.frames} synthetic-drive frames '
             f'(seed {args.seed}, 800x600), 1 engine thread.', '',
             '| task | form | file | inference p50 / p95 ms | accuracy | max steps from the '
             "graph's own semantics | within one step |", '|---|---|---|---|---|---|---|']
    for task, rows in report['tasks'].items():
        for label, row in rows.items():
            acc = (f'IoU {row["iou"]:.3f}' if 'iou' in row else f'EPE {row["epe_px"]:.3f} px')
            lines.append(f'| {task} | {label} | `{row["file"]}` | {row["inference_ms_p50"]} / '
                         f'{row["inference_ms_p95"]} | {acc} | '
                         f'{row.get("steps_from_graph_semantics_max", "n/a")} | '
                         f'{row.get("within_one_step", "n/a")} |')
    (out / f'{args.name}.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {out / args.name}.json and .md')


if __name__ == '__main__':
    main()
