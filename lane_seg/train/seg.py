"""
Lane segmentation training: float, post-training quantization and quantization-aware training.

``lane-seg train seg --data cache:DIR|folder:DIR|culane:DIR|tusimple:DIR [--val ...]`` trains
the U-Net with BCE + Dice on crops of the model input (the network is fully convolutional, so
crops keep the geometry and cost a fraction of a full frame), validates IoU and F1 at the
label's resolution, and writes safetensors checkpoints. ``--init CKPT --quant-bits 8`` turns a
float checkpoint into a fake-quantized one (BatchNorm folded), calibrates it (PTQ), and with
``--epochs > 0`` fine-tunes it (QAT).
"""

import argparse
from dataclasses import asdict, dataclass, field
import json
import math
from pathlib import Path
import random
import shlex
import sys
import time

import cv2
import numpy as np

from .cache import FrameCache
from ..data import open_lane_dataset
from ..pipeline.preprocess import prepare, roi_box

LANE_NORMALIZATION = {'scale': 1.0 / 255.0, 'mean': [0.485, 0.456, 0.406],
                      'std': [0.229, 0.224, 0.225]}


@dataclass
class SegTrainConfig:
    """Everything a run depends on (written into every checkpoint)."""

    data: str = 'cache:/work/cache/train'
    val: str = 'cache:/work/cache/val'
    out: str = 'runs/seg'
    arch: dict = field(default_factory=lambda: {'levels': 3, 'base': 24, 'variant': 'fast',
                                                'separable': False})
    input_size: tuple = (256, 512)
    roi: dict = field(default_factory=lambda: {'top': 0.35, 'bottom': 1.0, 'left': 0.0,
                                               'right': 1.0})
    crop: tuple = (128, 256)
    epochs: int = 8
    batch: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    threshold: float = 0.5
    seed: int = 0
    init: str = ''
    quant_bits: int = 0          # 0 float; 2..8 fake-quantized weights and activations
    act_bits: int = 0            # 0: same as quant_bits
    quant_scheme: str = 'ours'   # 'ours' or 'study' (see models.quant)
    calib_batches: int = 16
    max_val: int = 0             # 0 = all validation frames
    max_train: int = 0           # 0 = all training frames (else the first N)
    threads: int = 2


def quant_metadata(weight_bits: int, act_bits: int) -> dict:
    """Build the ``quantization`` metadata entry (float32 when ``weight_bits`` is 0)."""
    if not weight_bits:
        return {'scheme': 'float32'}
    scheme = 'qdq-int8-symmetric' if weight_bits == act_bits == 8 else \
        f'fake-quant-w{weight_bits}a{act_bits}'
    return {'scheme': scheme,
            'weights': {'bits': weight_bits, 'per_channel': True, 'symmetric': True},
            'activations': {'bits': act_bits, 'symmetric': True, 'per_tensor': True}}


def inherit_metadata(meta: dict, init_meta: dict) -> dict:
    """
    Build the metadata of a model fine-tuned from ``init_meta``.

    Its tensors, pre-processing and architecture carry over; a float init takes this run's
    quantization, a quantized init keeps its own bit widths.
    """
    out = dict(meta)
    for key in ('inputs', 'outputs', 'color_order', 'normalization', 'roi', 'threshold'):
        if key in init_meta:
            out[key] = init_meta[key]
    init_q = init_meta['architecture'].get('quant')
    quant = init_q or meta['architecture'].get('quant')
    out['architecture'] = dict(init_meta['architecture'], quant=quant)
    out['quantization'] = quant_metadata(quant['weight_bits'], quant['act_bits']) \
        if quant else {'scheme': 'float32'}
    return out


def lane_metadata(cfg: SegTrainConfig, name: str) -> dict:
    h, w = cfg.input_size
    out_stride = 2 if cfg.arch.get('variant', 'fast') == 'fast' else 1
    bits = cfg.quant_bits
    return {
        'format': 'lane_seg.model/1', 'task': 'lane_segmentation', 'name': name,
        'inputs': [{'name': 'image', 'shape': [1, 3, h, w], 'layout': 'NCHW',
                    'dtype': 'float32'}],
        'outputs': [{'name': 'logits', 'shape': [1, 1, h // out_stride, w // out_stride],
                     'kind': 'logits'}],
        'color_order': 'RGB', 'normalization': dict(LANE_NORMALIZATION),
        'roi': dict(cfg.roi), 'threshold': cfg.threshold,
        'quantization': quant_metadata(bits, cfg.act_bits or bits),
        'training': {'data': cfg.data, 'seed': cfg.seed, 'epochs': cfg.epochs,
                     'command': 'lane-seg train seg ' + shlex.join(sys.argv[3:])},
        'metrics': {}, 'weights_sha256': '',
        'architecture': {'type': 'unet', 'config': dict(cfg.arch),
                         'quant': ({'weight_bits': bits, 'act_bits': cfg.act_bits or bits,
                                    'per_channel': True, 'learn_scales': True,
                                    'scheme': cfg.quant_scheme}
                                   if bits else None)},
    }


class LaneSamples:
    """(image, binary mask) frames from a cache or any supported lane data set."""

    def __init__(self, spec: str):
        kind, _, path = spec.partition(':')
        if not path:
            raise ValueError(f'data {spec!r} must be KIND:PATH (cache, folder, culane, tusimple)')
        self.cache = FrameCache(path) if kind == 'cache' else None
        self.dataset = None if self.cache else open_lane_dataset(path, fmt=kind)

    def __len__(self):
        return len(self.cache) if self.cache else len(self.dataset)

    def __getitem__(self, i):
        if self.cache:
            return np.asarray(self.cache.images[i]), np.asarray(self.cache.masks[i]) > 0
        item = self.dataset[i]
        return item['image'], item['mask'] > 0


def _target(mask: np.ndarray, meta: dict) -> np.ndarray:
    """Binary lane mask cropped to the ROI and resized to the model input size (area)."""
    h, w = meta['inputs'][0]['shape'][2:]
    box = roi_box(mask.shape[0], mask.shape[1], meta.get('roi'))
    crop = mask[box.top:box.bottom, box.left:box.right].astype(np.float32)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)


def _augment(image, mask, rng):
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = image.astype(np.float32)
    image = image * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25)
    image = image + rng.normal(0, rng.uniform(0, 6), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), np.ascontiguousarray(mask)


def batches(samples, meta, cfg, rng, train=True):
    """Yield (x, y) float32 batches; random crops of the model input when training."""
    import torch
    order = list(range(len(samples)))
    if train:
        order = order[:cfg.max_train or None]
        rng.shuffle(order)
    elif cfg.max_val:
        order = order[:cfg.max_val]
    ch, cw = cfg.crop if train else cfg.input_size
    for start in range(0, len(order), cfg.batch):
        xs, ys = [], []
        for i in order[start:start + cfg.batch]:
            image, mask = samples[i]
            if train:
                image, mask = _augment(image, mask, rng)
            x, _ = prepare(image, meta)
            y = _target(mask, meta)
            if train:
                ch, cw = min(ch, x.shape[1]), min(cw, x.shape[2])
                top = rng.integers(0, x.shape[1] - ch + 1)
                left = rng.integers(0, x.shape[2] - cw + 1)
                x = x[:, top:top + ch, left:left + cw]
                y = y[top:top + ch, left:left + cw]
            xs.append(x)
            ys.append(y[None])
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def seg_loss(logits, target, dice_weight=1.0):
    """BCE + soft Dice at the logits' resolution (target area-resized to it)."""
    import torch.nn.functional as F
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target, size=logits.shape[-2:], mode='area')
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch_sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + dice_weight * dice.mean()


def torch_sigmoid(x):
    """Sigmoid (torch imported lazily: this module loads without torch)."""
    import torch
    return torch.sigmoid(x)


def evaluate(model, samples, meta, cfg) -> dict:
    """Compute IoU and F1 of lane pixels at the label's resolution, pooled over the set."""
    import torch
    import torch.nn.functional as F
    model.eval()
    tp = fp = fn = 0
    n = 0
    logit_t = math.log(cfg.threshold / (1 - cfg.threshold))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(samples) if not cfg.max_val else min(cfg.max_val, len(samples))):
            image, mask = samples[i]
            x, box = prepare(image, meta)
            logits = model(torch.from_numpy(x)[None])
            up = F.interpolate(logits, size=(box.height, box.width), mode='bilinear',
                               align_corners=False)[0, 0].numpy()
            pred = np.zeros(mask.shape, bool)
            pred[box.top:box.bottom, box.left:box.right] = up > logit_t
            tp += int(np.count_nonzero(pred & mask))
            fp += int(np.count_nonzero(pred & ~mask))
            fn += int(np.count_nonzero(~pred & mask))
            n += 1
    iou = tp / max(tp + fp + fn, 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {'iou': round(iou, 4), 'f1': round(f1, 4), 'frames': n,
            'seconds': round(time.perf_counter() - t0, 1)}


def train(cfg: SegTrainConfig, log=print) -> dict:
    """Run one training job; returns the final metrics and checkpoint path."""
    import torch
    from ..models import checkpoint
    from ..models.quant import calibrate
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out.name
    meta = lane_metadata(cfg, name)
    train_set, val_set = LaneSamples(cfg.data), LaneSamples(cfg.val)
    if cfg.init:
        model, init_meta = checkpoint.load_model(cfg.init, task='lane_segmentation')
        meta = inherit_metadata(meta, init_meta)
        if cfg.quant_bits and not init_meta['architecture'].get('quant'):
            from ..models.quant import quantize_model, QuantConfig
            quantize_model(model, QuantConfig(**meta['architecture']['quant']))
            calib = []
            for x, _ in batches(train_set, meta, cfg, rng):
                if len(calib) >= cfg.calib_batches:
                    break
                calib.append(x)
            calibrate(model, calib)
    else:
        model = checkpoint.build_model(meta['architecture'])
    history = []
    metrics = evaluate(model, val_set, meta, cfg) if cfg.init else {}
    if metrics:
        log(f'start: {metrics}')
        history.append({'epoch': 0, **metrics})
    if cfg.epochs > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil((cfg.max_train or len(train_set)) / cfg.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                    pct_start=0.15 if not cfg.init else 0.05)
        from tqdm import tqdm
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total, count = 0.0, 0
            bar = tqdm(batches(train_set, meta, cfg, rng), total=math.ceil(
                (cfg.max_train or len(train_set)) / cfg.batch), desc=f'epoch {epoch}/{cfg.epochs}',
                unit='batch', leave=False, disable=not sys.stderr.isatty())
            for x, y in bar:
                loss = seg_loss(model(x), y, cfg.dice_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * x.shape[0]
                count += x.shape[0]
            metrics = evaluate(model, val_set, meta, cfg)
            metrics['loss'] = round(total / max(count, 1), 4)
            history.append({'epoch': epoch, **metrics})
            log(f'epoch {epoch}: {metrics}')
    meta['metrics'] = {'val': metrics, 'history': history}
    meta['training']['config'] = json.loads(json.dumps(asdict(cfg)))
    path = checkpoint.save(out / f'{name}.safetensors', model, meta)
    return {'checkpoint': str(path), 'metrics': metrics}


def add_arguments(p: argparse.ArgumentParser):
    d = SegTrainConfig()
    p.add_argument('--data', default=d.data, help='KIND:PATH, KIND in cache folder culane '
                   'tusimple (default %(default)s)')
    p.add_argument('--val', default=d.val)
    p.add_argument('--out', default=d.out, help='run folder (its name names the model)')
    p.add_argument('--levels', type=int, default=d.arch['levels'])
    p.add_argument('--base', type=int, default=d.arch['base'])
    p.add_argument('--variant', default=d.arch['variant'], choices=['fast', 'classic'])
    p.add_argument('--separable', action='store_true')
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--batch', type=int, default=d.batch)
    p.add_argument('--lr', type=float, default=d.lr)
    p.add_argument('--dice-weight', type=float, default=d.dice_weight)
    p.add_argument('--crop', type=int, nargs=2, default=d.crop)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--init', default='', help='start from this checkpoint (fine-tune)')
    p.add_argument('--quant-bits', type=int, default=0, help='fake-quantize (2..8); with '
                   '--init: PTQ calibration, then QAT for --epochs')
    p.add_argument('--act-bits', type=int, default=0)
    p.add_argument('--quant-scheme', choices=['ours', 'study'], default='ours')
    p.add_argument('--max-val', type=int, default=0)
    p.add_argument('--max-train', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)


def config_from_args(args) -> SegTrainConfig:
    return SegTrainConfig(
        data=args.data, val=args.val, out=args.out,
        arch={'levels': args.levels, 'base': args.base, 'variant': args.variant,
              'separable': args.separable},
        crop=tuple(args.crop), epochs=args.epochs, batch=args.batch, lr=args.lr,
        dice_weight=args.dice_weight, seed=args.seed, init=args.init,
        quant_bits=args.quant_bits, act_bits=args.act_bits, quant_scheme=args.quant_scheme,
        max_val=args.max_val,
        max_train=args.max_train, threads=args.threads)
