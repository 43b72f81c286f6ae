"""
Lane segmentation training: float, post-training quantization and quantization-aware training.

``lane-seg train seg --data cache:DIR|folder:DIR|culane:DIR|tusimple:DIR [--val ...]`` trains
the U-Net with BCE + Dice on the whole model input (``--crop H W`` trains on random crops: the
network is fully convolutional, so crops keep the geometry at a fraction of the cost, but they
cost accuracy in the near field, docs/lane_model.md), validates IoU and F1 at the
label's resolution, and writes safetensors checkpoints. ``--init CKPT --quant-bits 8`` turns a
float checkpoint into a fake-quantized one (BatchNorm folded), calibrates it (PTQ), and with
``--epochs > 0`` fine-tunes it (QAT). The loop itself (torchrun / DistributedDataParallel,
resumable checkpoints, data-loading workers) is ``loop.fit``, shared with flow training.
"""

import argparse
from dataclasses import dataclass, field
import math
import shlex
import sys
import time

import cv2
import numpy as np

from .cache import Samples
from .loop import add_run_arguments, run_arguments, run_task, TrainTask
from ..data import open_lane_dataset
from ..pipeline.preprocess import prepare, roi_box

LANE_NORMALIZATION = {'scale': 1.0 / 255.0, 'mean': [0.485, 0.456, 0.406],
                      'std': [0.229, 0.224, 0.225]}


@dataclass
class RunConfig:
    """The settings both trainers share: seed, fine-tuning, quantization, limits, run control."""

    seed: int = 0
    init: str = ''
    crop: tuple = (256, 512)     # training crop; the whole default input: crops cost accuracy
    quant_bits: int = 0          # 0 float; 2..8 fake-quantized weights and activations
    act_bits: int = 0            # 0: same as quant_bits
    quant_scheme: str = 'ours'   # 'ours' or 'study' (see models.quant)
    unsigned_relu: bool = False  # low-bit studies: non-negative activations unsigned
    weight_clip: str = 'max'     # 'max' or 'mse' weight steps (see models.quant)
    act_clip: str = 'max'        # 'max' or 'mse' calibrated activation ranges
    first_layer_bits: int = 0    # input and first conv weights at this width (0: same)
    learn_bits: str = ''         # '', 'uniform' or 'per_layer' (issue #8)
    layer_bits: str = ''         # fixed per-layer widths: JSON file or learned checkpoint
    bits_hardware: str = 'size'  # 'sum_bits', 'size' or 'bitops'
    bits_lambda: float = 0.97
    bits_alpha: float = 4.0
    bits_lr: float = 0.05
    bits_optimizer: str = 'sgd'  # 'sgd' (the study) or 'adam' for the widths
    bits_every: int = 1
    calib_batches: int = 16
    max_val: int = 0             # 0 = all validation frames
    max_train: int = 0           # 0 = all training frames (else the first N)
    threads: int = 2             # torch threads per process
    workers: int = 0             # data-loading worker processes per rank (0: in-process)
    resume: str = ''             # '', a last.safetensors, a run folder, or 'auto'
    checkpoint_every: int = 0    # also write RUN/last.safetensors every N steps
    stop_after: int = 0          # stop after this global step, state saved (0: run to the end)
    sync_bn: bool = False        # torchrun: BatchNorm statistics of the global batch
    device: str = 'auto'         # auto (this rank's GPU if any), cpu, cuda[:N]


@dataclass
class SegTrainConfig(RunConfig):
    """Everything a run depends on (written into every checkpoint)."""

    data: str = 'cache:/work/cache/train'
    val: str = 'cache:/work/cache/val'
    out: str = 'runs/seg'
    arch: dict = field(default_factory=lambda: {'levels': 3, 'base': 24, 'variant': 'fast',
                                                'separable': False})
    input_size: tuple = (256, 512)
    roi: dict = field(default_factory=lambda: {'top': 0.35, 'bottom': 1.0, 'left': 0.0,
                                               'right': 1.0})
    epochs: int = 8
    batch: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    threshold: float = 0.5


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
    return {
        'format': 'lane_seg.model/1', 'task': 'lane_segmentation', 'name': name,
        'inputs': [{'name': 'image', 'shape': [1, 3, h, w], 'layout': 'NCHW',
                    'dtype': 'float32'}],
        'outputs': [{'name': 'logits', 'shape': [1, 1, h // out_stride, w // out_stride],
                     'kind': 'logits'}],
        'color_order': 'RGB', 'normalization': dict(LANE_NORMALIZATION),
        'roi': dict(cfg.roi), 'threshold': cfg.threshold,
        **run_metadata(cfg, 'seg', 'unet'),
    }


def run_metadata(cfg, verb: str, arch_type: str) -> dict:
    """Metadata entries every trained model shares: quantization, training, architecture."""
    bits = cfg.quant_bits
    return {
        'quantization': quant_metadata(bits, cfg.act_bits or bits),
        'training': {'data': cfg.data, 'seed': cfg.seed, 'epochs': cfg.epochs,
                     'command': f'lane-seg train {verb} ' + shlex.join(sys.argv[3:])},
        'metrics': {}, 'weights_sha256': '',
        'architecture': {'type': arch_type, 'config': dict(cfg.arch),
                         'quant': ({'weight_bits': bits, 'act_bits': cfg.act_bits or bits,
                                    'per_channel': True, 'learn_scales': True,
                                    'scheme': cfg.quant_scheme,
                                    'unsigned_relu': cfg.unsigned_relu,
                                    'weight_clip': cfg.weight_clip,
                                    'act_clip': cfg.act_clip,
                                    'first_layer_bits': cfg.first_layer_bits}
                                   if bits else None)},
    }


class LaneSamples(Samples):
    """(image, binary mask) frames from a cache or any supported lane data set."""

    kinds = ('folder', 'culane', 'tusimple')

    def open_dataset(self, path, kind):
        return open_lane_dataset(path, fmt=kind)

    def from_cache(self, cache, i):
        return np.asarray(cache.images[i]), np.asarray(cache.masks[i]) > 0

    def from_item(self, item):
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


def train_item(samples, i, meta, cfg, rng):
    """Return sample ``i`` augmented with ``rng``: a random crop (x, y) of input and target."""
    image, mask = _augment(*samples[i], rng)
    x, _ = prepare(image, meta)
    y = _target(mask, meta)
    ch, cw = min(cfg.crop[0], x.shape[1]), min(cfg.crop[1], x.shape[2])
    top = rng.integers(0, x.shape[1] - ch + 1)
    left = rng.integers(0, x.shape[2] - cw + 1)
    return x[:, top:top + ch, left:left + cw], y[None, top:top + ch, left:left + cw]


def batches(samples, meta, cfg, rng, train=True):
    """Yield (x, y) float32 batches; random crops of the model input when training."""
    import torch
    order = list(range(len(samples)))
    if train:
        order = order[:cfg.max_train or None]
        rng.shuffle(order)
    elif cfg.max_val:
        order = order[:cfg.max_val]
    for start in range(0, len(order), cfg.batch):
        if train:
            xs, ys = zip(*(train_item(samples, i, meta, cfg, rng)
                           for i in order[start:start + cfg.batch]))
        else:
            xs, ys = [], []
            for i in order[start:start + cfg.batch]:
                image, mask = samples[i]
                xs.append(prepare(image, meta)[0])
                ys.append(_target(mask, meta)[None])
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def calibration_inputs(samples, meta, cfg, rng):
    """Yield the input batches of PTQ calibration (training crops, as before QAT)."""
    for x, _ in batches(samples, meta, cfg, rng):
        yield x


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


def seg_loss_terms(logits, target, dice_weight=1.0):
    """Return (loss x samples, samples): ``loop.fit`` pools it exactly over ranks."""
    return seg_loss(logits, target, dice_weight) * target.shape[0], target.shape[0]


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
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(samples) if not cfg.max_val else min(cfg.max_val, len(samples))):
            image, mask = samples[i]
            x, box = prepare(image, meta)
            logits = model(torch.from_numpy(x)[None].to(device))
            up = F.interpolate(logits, size=(box.height, box.width), mode='bilinear',
                               align_corners=False)[0, 0].cpu().numpy()
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


def _loss(cfg, logits, y):
    return seg_loss_terms(logits, y, cfg.dice_weight)


TASK = TrainTask(name='seg', task='lane_segmentation', metadata=lane_metadata,
                 samples=LaneSamples, item=train_item, calibration=calibration_inputs,
                 loss=_loss, evaluate=evaluate)


def train(cfg: SegTrainConfig, log=print) -> dict:
    """
    Run one training job (alone, or as one rank under torchrun); see ``loop.fit``.

    Returns the checkpoint path and the final metrics (on every rank), and 'stopped_at_step'
    when the run stopped early with its state in ``RUN/last.safetensors``.
    """
    return run_task(TASK, cfg, log)


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
    add_common_arguments(p, d)


def add_common_arguments(p: argparse.ArgumentParser, d):
    """Arguments both trainers share: seed, fine-tuning, quantization, limits, run control."""
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--init', default='', help='start from this checkpoint (fine-tune)')
    p.add_argument('--crop', type=int, nargs=2, default=d.crop, metavar=('H', 'W'),
                   help='random training crop of the model input (default: the whole '
                        '256x512 input; 128 256 trains 4x faster per sample, but the '
                        'crop-trained models missed lane pixels in near-field dash gaps and had '
                        '1.5x the flow EPE: docs/lane_model.md, docs/flow_model.md)')
    p.add_argument('--quant-bits', type=int, default=0, help='fake-quantize (2..8); with '
                   '--init: PTQ calibration, then QAT for --epochs')
    p.add_argument('--act-bits', type=int, default=0)
    p.add_argument('--quant-scheme', choices=['ours', 'study'], default='ours')
    p.add_argument('--unsigned-relu', action='store_true',
                   help='quantize non-negative activations on [0, 2^b - 1] (twice the levels; '
                        'low-bit studies, not the int8 form TensorRT takes)')
    p.add_argument('--weight-clip', choices=['max', 'mse'], default=d.weight_clip,
                   help='weight step per channel: max|w| / qmax, or the least-squared-error '
                        'clip (helps at 4 bits and below)')
    p.add_argument('--act-clip', choices=['max', 'mse'], default=d.act_clip,
                   help='calibrated activation range: the largest value seen, or the '
                        'least-squared-error clip of a sample (helps at 4 bits and below)')
    p.add_argument('--first-layer-bits', type=int, default=d.first_layer_bits,
                   help='the network input and the first conv weights at this width (2..8; '
                        '0: the same as --quant-bits); the usual 8 for 4-bit studies')
    p.add_argument('--learn-bits', choices=['', 'uniform', 'per_layer'], default='',
                   help='learn bit widths (2..8) with a hardware loss (needs --quant-bits)')
    p.add_argument('--layer-bits', default='', metavar='FILE',
                   help='train (QAT) at fixed per-layer widths (2..8; needs --quant-bits and a '
                        'float --init): a JSON file {"weights": {layer: bits}, "activations": '
                        '{layer: bits}} or a --learn-bits checkpoint (retrain at its learned '
                        'widths); layers not named keep --quant-bits')
    p.add_argument('--bits-hardware', choices=['sum_bits', 'size', 'bitops'], default='size')
    p.add_argument('--bits-lambda', type=float, default=d.bits_lambda)
    p.add_argument('--bits-alpha', type=float, default=d.bits_alpha)
    p.add_argument('--bits-lr', type=float, default=d.bits_lr)
    p.add_argument('--bits-optimizer', choices=['sgd', 'adam'], default=d.bits_optimizer,
                   help="optimizer of the widths (sgd: the study's gradient step)")
    p.add_argument('--bits-every', type=int, default=d.bits_every)
    p.add_argument('--max-val', type=int, default=0)
    p.add_argument('--max-train', type=int, default=0)
    p.add_argument('--threads', type=int, default=2, help='torch threads per process')
    add_run_arguments(p)


def common_config(args) -> dict:
    """Config fields of ``add_common_arguments`` (plus the run-control ones)."""
    return dict(
        seed=args.seed, init=args.init, crop=tuple(args.crop), quant_bits=args.quant_bits,
        act_bits=args.act_bits, quant_scheme=args.quant_scheme,
        unsigned_relu=args.unsigned_relu, weight_clip=args.weight_clip, act_clip=args.act_clip,
        first_layer_bits=args.first_layer_bits, learn_bits=args.learn_bits,
        layer_bits=args.layer_bits,
        bits_hardware=args.bits_hardware, bits_lambda=args.bits_lambda,
        bits_alpha=args.bits_alpha, bits_lr=args.bits_lr, bits_every=args.bits_every,
        bits_optimizer=args.bits_optimizer,
        max_val=args.max_val, max_train=args.max_train, threads=args.threads,
        **run_arguments(args))


def config_from_args(args) -> SegTrainConfig:
    return SegTrainConfig(
        data=args.data, val=args.val, out=args.out,
        arch={'levels': args.levels, 'base': args.base, 'variant': args.variant,
              'separable': args.separable},
        epochs=args.epochs, batch=args.batch, lr=args.lr,
        dice_weight=args.dice_weight, **common_config(args))
