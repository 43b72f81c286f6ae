"""
Tiny self-describing test models, built once per test session (torch + onnx, a few seconds).

``build(folder)`` exports, for the engine, pipeline, model-info and bench tests:

- ``lane_fp32.onnx`` / ``lane_int8_qdq.onnx`` / ``lane_int8_ort.onnx`` (and every
  ``*_int8_ort.onnx`` with its ``*_int8_u8u8.onnx``): a small fast U-Net at
  64x128, RGB, ImageNet normalization, ROI from 25 % of the height down, with checkpoints
  ``lane.safetensors`` (float) and ``lane_q.safetensors`` (fake-quantized) named in their
  metadata for the torch backend;
- ``other_fp32.onnx`` / ``other_int8_qdq.onnx`` / ``other_int8_ort.onnx``: the same family at
  another input size (48x96), BGR order, [-1, 1] normalization, full-frame ROI, threshold 0.3;
- ``flow_fp32.onnx`` / ``flow_int8_qdq.onnx`` / ``flow_int8_ort.onnx``: a tiny FlowNetS at
  64x128 with its checkpoints;
- ``const_flow.onnx``: a flow "model" whose output is the constant (0.5, -0.25) per output unit
  (flow_scale 4 -> (2, -1) input pixels), to check the scaling to camera pixels exactly.

Models are briefly fitted to the synthetic drive so that their logits are confident (parity
tests on untrained models would mostly measure noise around the threshold).
"""

import copy
import json
from pathlib import Path

import numpy as np

LANE_NORM = {'scale': 1.0 / 255.0, 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
OTHER_NORM = {'scale': 1.0 / 127.5, 'mean': [1.0, 1.0, 1.0], 'std': [1.0, 1.0, 1.0]}
UNET_ARCH = {'levels': 1, 'base': 4, 'variant': 'fast', 'separable': False}
FLOW_ARCH = {'width': 0.05, 'levels': 3}
QUANT = {'weight_bits': 8, 'act_bits': 8, 'per_channel': True, 'learn_scales': True}
CONST_FLOW = (0.5, -0.25)
_BUILT = {}


def lane_meta(name, hw, color_order='RGB', norm=None, roi=None, threshold=0.5,
              quantized=False, checkpoint=None):
    h, w = hw
    meta = {
        'format': 'lane_seg.model/1', 'task': 'lane_segmentation', 'name': name,
        'inputs': [{'name': 'image', 'shape': [1, 3, h, w], 'layout': 'NCHW',
                    'dtype': 'float32'}],
        'outputs': [{'name': 'logits', 'shape': [1, 1, h // 2, w // 2], 'kind': 'logits'}],
        'color_order': color_order, 'normalization': copy.deepcopy(norm or LANE_NORM),
        'roi': roi or {'top': 0.0, 'bottom': 1.0, 'left': 0.0, 'right': 1.0},
        'threshold': threshold,
        'quantization': ({'scheme': 'qdq-int8-symmetric', 'weights': {'bits': 8},
                          'activations': {'bits': 8}} if quantized else {'scheme': 'float32'}),
        'training': {'data': 'synthetic drive (test fixture)', 'seed': 0},
        'metrics': {}, 'weights_sha256': '',
        'architecture': {'type': 'unet', 'config': dict(UNET_ARCH),
                         'quant': dict(QUANT) if quantized else None},
    }
    if checkpoint:
        meta['checkpoint'] = checkpoint
    return meta


def flow_meta(name, hw, out_hw, flow_scale, quantized=False, checkpoint=None, arch=True):
    h, w = hw
    meta = {
        'format': 'lane_seg.model/1', 'task': 'optical_flow', 'name': name,
        'inputs': [{'name': 'frames', 'shape': [1, 6, h, w], 'layout': 'NCHW',
                    'dtype': 'float32'}],
        'outputs': [{'name': 'flow', 'shape': [1, 2, out_hw[0], out_hw[1]], 'kind': 'flow',
                     'flow_scale': flow_scale}],
        'color_order': 'RGB', 'normalization': copy.deepcopy(LANE_NORM),
        'quantization': ({'scheme': 'qdq-int8-symmetric'} if quantized
                         else {'scheme': 'float32'}),
        'training': {'data': 'synthetic drive (test fixture)', 'seed': 0},
        'metrics': {}, 'weights_sha256': '',
    }
    if arch:
        meta['architecture'] = {'type': 'flownets', 'config': dict(FLOW_ARCH),
                                'quant': dict(QUANT) if quantized else None}
    if checkpoint:
        meta['checkpoint'] = checkpoint
    return meta


def drive_frames(hw, count=6, seed=3):
    """Frames (image, lane mask, flow, ...) of a small synthetic drive."""
    from lane_seg.sim import DriveConfig, SyntheticDrive
    drive = SyntheticDrive(DriveConfig.sized(seed, hw[0], hw[1]))
    return list(drive.frames(count))


def fixture_frames():
    """Return the frames the models are fitted and calibrated on (parity tests use them)."""
    key = 'frames'
    if key not in _BUILT:
        _BUILT[key] = drive_frames((96, 192), count=5, seed=3)
    return _BUILT[key]


def flow_inputs(meta):
    """(N, 6, h, w) stacked consecutive test frames, normalized as ``meta`` says."""
    from lane_seg.pipeline.preprocess import prepare
    xs = [prepare(f.image, meta, 'bgr8')[0] for f in fixture_frames()]
    return np.stack([np.concatenate([a, b]) for a, b in zip(xs[:-1], xs[1:])])


def _lane_batches(meta, frames):
    import cv2
    from lane_seg.pipeline.preprocess import prepare
    import torch
    xs, ys = [], []
    h, w = meta['inputs'][0]['shape'][2:]
    for f in frames:
        x, box = prepare(f.image, meta, 'bgr8')
        # Thick targets (dilated boundaries): learnable by a tiny model in a few steps.
        m = cv2.dilate(f.lane_binary, np.ones((5, 5), np.uint8))
        m = m[box.top:box.bottom, box.left:box.right].astype(np.float32)
        ys.append(cv2.resize(m, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        xs.append(x)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)[:, None])


def _fit(model, x, y, steps=100, lr=0.03):
    import torch
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x), y, pos_weight=torch.tensor(4.0))
        loss.backward()
        opt.step()
    model.eval()
    return model


def _export_family(folder, stem, model, meta_fn, calib, ckpt_float, ckpt_q):
    """fp32 ONNX + checkpoint, then PTQ: fake-quant checkpoint, QDQ ONNX and ORT ONNX."""
    from lane_seg.models import checkpoint
    from lane_seg.models.export import export_onnx, to_ort_int8, to_u8u8
    from lane_seg.models.quant import calibrate, freeze_for_export, quantize_model, QuantConfig
    fp32_meta = meta_fn(False, ckpt_float)
    checkpoint.save(folder / ckpt_float, model, fp32_meta)
    export_onnx(model, fp32_meta, folder / f'{stem}_fp32.onnx')
    quantize_model(model, QuantConfig(**QUANT))
    calibrate(model, calib)
    q_meta = meta_fn(True, ckpt_q)
    checkpoint.save(folder / ckpt_q, model, q_meta)
    freeze_for_export(model)
    export_onnx(model, q_meta, folder / f'{stem}_int8_qdq.onnx')
    to_ort_int8(folder / f'{stem}_int8_qdq.onnx', folder / f'{stem}_int8_ort.onnx')
    to_u8u8(folder / f'{stem}_int8_ort.onnx', folder / f'{stem}_int8_u8u8.onnx')


class ConstFlow:
    """Factory of the constant-output flow module (torch imported lazily)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Const(nn.Module):

            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(6, 2, 3, stride=2, padding=1)
                with torch.no_grad():
                    self.conv.weight.zero_()
                    self.conv.bias.copy_(torch.tensor(CONST_FLOW))

            def forward(self, x):
                return self.conv(x)
        return Const()


def session_models(tmp_path_factory) -> dict:
    """Return the models of this test session (built on first use)."""
    if 'models' not in _BUILT:
        build(tmp_path_factory.mktemp('engine_models'))
    return _BUILT['models']


def build(folder) -> dict:
    """Build every test model into ``folder`` (once per session); returns name -> Path."""
    if 'models' in _BUILT:
        return _BUILT['models']
    folder = Path(folder)
    import torch
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core host, two torch threads spin against other processes and
    # the fixture takes 20x longer.
    torch.set_num_threads(1)
    try:
        return _build(folder)
    finally:
        torch.set_num_threads(threads)


def _build(folder):
    import torch
    from lane_seg.models.export import export_onnx
    from lane_seg.models.flownet import FlowNetConfig, FlowNetS, FLOW_DIV
    from lane_seg.models.unet import UNet, UNetConfig
    torch.manual_seed(0)
    frames = fixture_frames()

    # Lane model at 64x128, RGB, ImageNet normalization, ROI below 25 % of the height.
    roi = {'top': 0.25, 'bottom': 1.0, 'left': 0.0, 'right': 1.0}
    base = lane_meta('lane', (64, 128), roi=roi)
    x, y = _lane_batches(base, frames)
    model = _fit(UNet(UNetConfig(**UNET_ARCH)), x, y)
    _export_family(folder, 'lane', model,
                   lambda q, ck: lane_meta('lane_int8' if q else 'lane_fp32', (64, 128),
                                           roi=roi, quantized=q, checkpoint=ck),
                   [x], 'lane.safetensors', 'lane_q.safetensors')

    # The other model: another size, colour order, normalization, ROI and threshold.
    def other(q, ck):
        return lane_meta('other_int8' if q else 'other_fp32', (48, 96), color_order='BGR',
                         norm=OTHER_NORM, threshold=0.3, quantized=q, checkpoint=ck)
    x, y = _lane_batches(other(False, None), frames)
    model = _fit(UNet(UNetConfig(**UNET_ARCH)), x, y)
    _export_family(folder, 'other', model, other, [x], 'other.safetensors',
                   'other_q.safetensors')

    # A tiny FlowNetS (output at 1/4 of the input, head x FLOW_DIV = input pixels).
    flow_model = FlowNetS(FlowNetConfig(**FLOW_ARCH)).eval()
    calib = torch.from_numpy(flow_inputs(flow_meta('flow', (64, 128), (16, 32), FLOW_DIV)))
    _export_family(folder, 'flow', flow_model,
                   lambda q, ck: flow_meta('flow_int8' if q else 'flow_fp32', (64, 128),
                                           (16, 32), FLOW_DIV, quantized=q, checkpoint=ck),
                   [calib], 'flow.safetensors', 'flow_q.safetensors')

    export_onnx(ConstFlow.build(), flow_meta('const_flow', (64, 128), (32, 64), 4.0,
                                             arch=False),
                folder / 'const_flow.onnx')
    paths = {p.stem: p for p in folder.iterdir() if p.suffix in ('.onnx', '.safetensors')}
    _BUILT['models'] = paths
    return paths


def strip_metadata(src, dst):
    """Copy an ONNX model without its lane_seg metadata (and without a sidecar)."""
    import onnx
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save(model, str(dst))
    side = Path(dst).with_suffix('.json')
    if side.exists():
        side.unlink()
    return Path(dst)


def read_sidecar(path):
    return json.loads(Path(path).with_suffix('.json').read_text())
