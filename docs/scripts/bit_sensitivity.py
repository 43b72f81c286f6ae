"""
Per-quantizer low-bit sensitivity of a lane U-Net: which layers break it at 4 bits.

Every quantizer of the model (each conv's weights, each activation) starts at 8 bits after
post-training calibration (unsigned ReLU grids, least-error weight steps); one at a time is set
to ``--bits`` (an activation keeps its calibrated clipping range on the coarser grid, a weight
step is re-derived), the validation IoU is measured, and the quantizer goes back to 8 bits. The
drop from the all-8-bit IoU is that quantizer's cost. Each activation range (``--act-clips max
mse``: calibrated at the largest value, or by least squared error) gets its own column.
Run from the repository root, e.g.::

    .venv/bin/python docs/scripts/bit_sensitivity.py \
        --float runs/lane_full46/lane_full46.safetensors --data cache:CACHE/train800b \
        --val cache:CACHE/val800 --max-val 24 \
        --out docs/studies/lane_bit_sensitivity

Writes ``results.json``, ``table.md`` and ``sensitivity.png`` into ``--out``.
"""

import argparse
import json
from pathlib import Path


def measure(float_ckpt, data, val, max_val, bits, act_clip, calib_batches=4, seed=0, log=print):
    """Return {'base': IoU all at 8 bits, 'rows': [(kind, name, IoU with it at ``bits``)]}."""
    import numpy as np
    import torch

    from lane_seg.models.bitwidth import set_bits
    from lane_seg.models.checkpoint import load_model
    from lane_seg.models.quant import ActQuant, calibrate, QConv2d, quantize_model, QuantConfig
    from lane_seg.train import seg

    torch.manual_seed(seed)
    model, meta = load_model(float_ckpt, task='lane_segmentation')
    quantize_model(model, QuantConfig(unsigned_relu=True, weight_clip='mse', act_clip=act_clip))
    cfg = seg.SegTrainConfig(data=data, val=val, max_val=max_val, batch=8)
    train_set, val_set = seg.LaneSamples(cfg.data), seg.LaneSamples(cfg.val)
    batches = seg.calibration_inputs(train_set, meta, cfg, np.random.default_rng(seed))
    calibrate(model, (next(batches) for _ in range(calib_batches)))
    base = seg.evaluate(model, val_set, meta, cfg)['iou']
    log(f'all at 8 bits: IoU {base:.4f}')
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (QConv2d, ActQuant)):
            continue
        scale = m.scale.detach().clone() if isinstance(m, ActQuant) else None
        set_bits(m, bits)
        iou = seg.evaluate(model, val_set, meta, cfg)['iou']
        set_bits(m, 8, keep_range=False)
        if scale is not None:
            m.scale.data.copy_(scale)
        kind = 'weights' if isinstance(m, QConv2d) else 'activations'
        rows.append((kind, name, iou))
        log(f'{kind} {name}: {base - iou:+.4f}')
    return {'base': base, 'rows': rows}


def write(out: Path, results: dict, bits: int, command: str):
    """Write results.json, table.md and sensitivity.png (IoU cost per quantizer, per clip)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    clips = list(results)
    names = [(kind, name) for kind, name, _ in results[clips[0]]['rows']]
    cost = {clip: {(k, n): results[clip]['base'] - iou for k, n, iou in results[clip]['rows']}
            for clip in clips}
    lines = [f'# IoU cost of one quantizer at {bits} bits (all others at 8)', '',
             f'Command: `{command}`', '',
             '| quantizer | ' + ' | '.join(f'cost, {c} range' for c in clips) + ' |',
             '|---|' + '---|' * len(clips),
             '| (all at 8 bits: IoU) | ' + ' | '.join(f'{results[c]["base"]:.4f}'
                                                      for c in clips) + ' |']
    for key in names:
        lines.append(f'| {key[1]} ({key[0]}) | '
                     + ' | '.join(f'{cost[c][key]:+.4f}' for c in clips) + ' |')
    (out / 'table.md').write_text('\n'.join(lines) + '\n')
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(names) + 1.2))
    height = 0.8 / len(clips)
    for i, clip in enumerate(clips):
        ax.barh([j + i * height for j in range(len(names))], [cost[clip][k] for k in names],
                height=height, label=f'activation range: {clip}')
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels([f'{n} ({k[0]})' for k, n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f'IoU lost with this quantizer alone at {bits} bits')
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(out / 'sensitivity.png', dpi=110)


def main(argv=None):
    import shlex
    import sys

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    p.add_argument('--float', required=True, help='float lane checkpoint (.safetensors)')
    p.add_argument('--data', required=True, help='calibration frames (a cache:DIR or data set)')
    p.add_argument('--val', required=True, help='validation frames')
    p.add_argument('--max-val', type=int, default=24)
    p.add_argument('--bits', type=int, default=4)
    p.add_argument('--act-clips', nargs='+', default=['max', 'mse'], choices=['max', 'mse'])
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(2)
    results = {clip: measure(args.float, args.data, args.val, args.max_val, args.bits, clip)
               for clip in args.act_clips}
    command = '.venv/bin/python docs/scripts/bit_sensitivity.py ' + shlex.join(sys.argv[1:])
    write(Path(args.out), results, args.bits, command)


if __name__ == '__main__':
    main()
