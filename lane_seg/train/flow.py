"""
Optical-flow training of the quantizable FlowNetSimple: float, PTQ and QAT.

``lane-seg train flow --data cache:DIR|folder:DIR|kitti:DIR`` trains on frame pairs with exact
flow, loss = end-point error over valid pixels at the output resolution (1/4 of the input),
validates EPE at the ground truth's resolution. ``--init CKPT --quant-bits B`` quantizes
(BatchNorm folded, per-channel weights, learned activation ranges), calibrates and fine-tunes.
The loop (torchrun / DistributedDataParallel, resumable checkpoints, workers) is ``loop.fit``.
"""

import argparse
from dataclasses import dataclass, field
import time

import cv2
import numpy as np

from .cache import Samples
from .loop import run_task, TrainTask
from .seg import (add_common_arguments, common_config, LANE_NORMALIZATION, run_metadata,
                  RunConfig)
from ..data import open_flow_dataset
from ..pipeline.preprocess import prepare


@dataclass
class FlowTrainConfig(RunConfig):
    """Everything a flow run depends on."""

    data: str = 'cache:/work/cache/train'
    val: str = 'cache:/work/cache/val'
    out: str = 'runs/flow'
    arch: dict = field(default_factory=lambda: {'width': 0.25, 'levels': 6})
    input_size: tuple = (256, 512)
    epochs: int = 8
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4


def flow_metadata(cfg: FlowTrainConfig, name: str) -> dict:
    from ..models.flownet import FLOW_DIV
    h, w = cfg.input_size
    return {
        'format': 'lane_seg.model/1', 'task': 'optical_flow', 'name': name,
        'inputs': [{'name': 'frames', 'shape': [1, 6, h, w], 'layout': 'NCHW',
                    'dtype': 'float32', 'stacking': 'previous, current'}],
        'outputs': [{'name': 'flow', 'shape': [1, 2, h // 4, w // 4], 'kind': 'flow',
                     'flow_scale': FLOW_DIV, 'units': 'pixels of the model input per frame',
                     'direction': 'forward: previous -> current'}],
        'color_order': 'RGB', 'normalization': dict(LANE_NORMALIZATION),
        'roi': {'top': 0.0, 'bottom': 1.0, 'left': 0.0, 'right': 1.0},
        **run_metadata(cfg, 'flow', 'flownets'),
    }


class FlowSamples(Samples):
    """(image1, image2, flow, valid) pairs from a cache or a flow data set."""

    kinds = ('folder', 'kitti')

    def open_dataset(self, path, kind):
        return open_flow_dataset(path, fmt=kind)

    def from_cache(self, c, i):
        return (np.asarray(c.images[i]), np.asarray(c.next[i]),
                np.asarray(c.flow[i], dtype=np.float32), np.asarray(c.valid[i]))

    def from_item(self, item):
        return item['image1'], item['image2'], item['flow'], item['valid']


def stack_frames(image1, image2, meta):
    x1, _ = prepare(image1, meta)
    x2, _ = prepare(image2, meta)
    return np.concatenate([x1, x2], axis=0)


def _target(flow, valid, meta):
    """GT flow in model-input pixels at the input size, and its validity."""
    h, w = meta['inputs'][0]['shape'][2:]
    sy, sx = h / flow.shape[0], w / flow.shape[1]
    f = cv2.resize(np.nan_to_num(flow), (w, h), interpolation=cv2.INTER_AREA)
    f[..., 0] *= sx
    f[..., 1] *= sy
    v = cv2.resize(valid.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.99
    return f.transpose(2, 0, 1), v


def train_item(samples, i, meta, cfg, rng, train=True):
    """Return pair ``i`` (augmented with ``rng`` when training) as a random crop (x, f, v)."""
    image1, image2, flow, valid = samples[i]
    if train and rng.random() < 0.5:   # horizontal flip: u changes sign
        image1, image2 = image1[:, ::-1], image2[:, ::-1]
        flow = flow[:, ::-1] * np.array([-1.0, 1.0], np.float32)
        valid = valid[:, ::-1]
    if train:
        gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
        image1 = np.clip(image1 * gain + bias, 0, 255).astype(np.uint8)
        image2 = np.clip(image2 * gain + bias, 0, 255).astype(np.uint8)
    x = stack_frames(np.ascontiguousarray(image1), np.ascontiguousarray(image2), meta)
    f, v = _target(np.ascontiguousarray(flow), np.ascontiguousarray(valid), meta)
    ch, cw = min(cfg.crop[0], x.shape[1]), min(cfg.crop[1], x.shape[2])
    top = rng.integers(0, x.shape[1] - ch + 1) // 4 * 4
    left = rng.integers(0, x.shape[2] - cw + 1) // 4 * 4
    return (x[:, top:top + ch, left:left + cw], f[:, top:top + ch, left:left + cw],
            v[top:top + ch, left:left + cw])


def batches(samples, meta, cfg, rng, train=True):
    import torch
    order = list(range(len(samples)))
    if train:
        order = order[:cfg.max_train or None]
        rng.shuffle(order)
    for start in range(0, len(order), cfg.batch):
        xs, fs, vs = zip(*(train_item(samples, i, meta, cfg, rng, train)
                           for i in order[start:start + cfg.batch]))
        yield (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(fs)),
               torch.from_numpy(np.stack(vs)))


def calibration_inputs(samples, meta, cfg, rng):
    """Yield the input batches of PTQ calibration."""
    for x, _, _ in batches(samples, meta, cfg, rng):
        yield x


def flow_loss_terms(pred, flow, valid):
    """Return (sum of EPE over valid pixels, valid pixels) at the prediction's resolution."""
    import torch.nn.functional as F
    from ..models.flownet import FLOW_DIV
    size = pred.shape[-2:]
    f = F.interpolate(flow, size=size, mode='area')
    v = F.interpolate(valid[:, None].float(), size=size, mode='area') > 0.99
    err = (pred * FLOW_DIV - f).pow(2).sum(1, keepdim=True).add(1e-6).sqrt()
    return (err * v).sum(), v.sum()


def flow_loss(pred, flow, valid):
    """EPE over valid pixels at the prediction's resolution (GT area-pooled to it)."""
    total, count = flow_loss_terms(pred, flow, valid)
    return total / count.clamp(min=1)


def predict_full(model, image1, image2, meta):
    """Model flow resized to the frames' resolution, in frame pixels."""
    import torch
    import torch.nn.functional as F
    from ..models.flownet import FLOW_DIV
    h, w = meta['inputs'][0]['shape'][2:]
    x = torch.from_numpy(stack_frames(image1, image2, meta))[None]
    out = model(x.to(next(model.parameters()).device)) * FLOW_DIV
    H, W = image1.shape[:2]
    up = F.interpolate(out, size=(H, W), mode='bilinear', align_corners=False)[0].cpu().numpy()
    return np.stack([up[0] * (W / w), up[1] * (H / h)], axis=-1)


def evaluate(model, samples, meta, cfg) -> dict:
    import torch
    from ..metrics import epe, fl_all, flow_valid_count
    model.eval()
    tot_e = tot_o = 0.0
    cnt = 0
    n = len(samples) if not cfg.max_val else min(cfg.max_val, len(samples))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            image1, image2, flow, valid = samples[i]
            pred = predict_full(model, image1, image2, meta)
            k = flow_valid_count(flow, valid)
            if k:
                tot_e += epe(pred, flow, valid) * k
                tot_o += fl_all(pred, flow, valid) * k
                cnt += k
    return {'epe': round(tot_e / max(cnt, 1), 4), 'fl_all': round(tot_o / max(cnt, 1), 4),
            'frames': n, 'seconds': round(time.perf_counter() - t0, 1)}


def _loss(_cfg, pred, flow, valid):
    return flow_loss_terms(pred, flow, valid)


TASK = TrainTask(name='flow', task='optical_flow', metadata=flow_metadata, samples=FlowSamples,
                 item=train_item, calibration=calibration_inputs, loss=_loss,
                 evaluate=evaluate)


def train(cfg: FlowTrainConfig, log=print) -> dict:
    """
    Run one training job (alone, or as one rank under torchrun); see ``loop.fit``.

    Returns the checkpoint path and the final metrics (on every rank), and 'stopped_at_step'
    when the run stopped early with its state in ``RUN/last.safetensors``.
    """
    return run_task(TASK, cfg, log)


def add_arguments(p: argparse.ArgumentParser):
    d = FlowTrainConfig()
    p.add_argument('--data', default=d.data, help='KIND:PATH, KIND in cache folder kitti')
    p.add_argument('--val', default=d.val)
    p.add_argument('--out', default=d.out)
    p.add_argument('--width', type=float, default=d.arch['width'])
    p.add_argument('--levels', type=int, default=d.arch['levels'])
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--batch', type=int, default=d.batch)
    p.add_argument('--lr', type=float, default=d.lr)
    add_common_arguments(p, d)


def config_from_args(args) -> FlowTrainConfig:
    return FlowTrainConfig(
        data=args.data, val=args.val, out=args.out,
        arch={'width': args.width, 'levels': args.levels}, epochs=args.epochs,
        batch=args.batch, lr=args.lr, **common_config(args))
