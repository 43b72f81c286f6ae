"""
Bit-width study: accuracy of PTQ and QAT from one float checkpoint, 8 down to 2 bits.

Run from the repository root, e.g.::

    .venv/bin/python docs/scripts/quant_study.py seg --float runs/lane_unet_fp32.safetensors \
        --out docs/studies/lane_bits --bits 8 6 5 4 3 2 --qat-epochs 1 --max-train 400

Writes ``results.json``, ``table.md`` and ``bits.png`` into ``--out``.
"""

import argparse
import json
from pathlib import Path


def run(task, float_ckpt, out, bits, schemes, qat_epochs, max_train, max_val, data, val,
        crop=(128, 256)):
    if task == 'seg':
        from lane_seg.train.seg import SegTrainConfig as Config, train
        metric = 'iou'
    else:
        from lane_seg.train.flow import FlowTrainConfig as Config, train
        metric = 'epe'
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    base = Config(data=data, val=val, init=float_ckpt, epochs=0, max_val=max_val, crop=crop,
                  out=str(out / 'runs' / 'float'))
    float_metrics = train(base, log=lambda m: None)['metrics']
    rows.append({'scheme': 'float', 'bits': 32, 'ptq': float_metrics[metric],
                 'qat': float_metrics[metric]})
    for scheme in schemes:
        for b in bits:
            name = f'{scheme}_w{b}a{b}'
            cfg = Config(data=data, val=val, init=float_ckpt, quant_bits=b, act_bits=b,
                         quant_scheme=scheme, epochs=0, max_val=max_val, crop=crop,
                         out=str(out / 'runs' / f'{name}_ptq'))
            ptq = train(cfg, log=lambda m: None)
            row = {'scheme': scheme, 'bits': b, 'ptq': ptq['metrics'][metric], 'qat': None}
            if qat_epochs > 0:
                cfg.epochs = qat_epochs
                cfg.max_train = max_train
                cfg.lr = 5e-4
                cfg.out = str(out / 'runs' / f'{name}_qat')
                row['qat'] = train(cfg, log=lambda m: None)['metrics'][metric]
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / 'results.json').write_text(json.dumps(
        {'task': task, 'metric': metric, 'float_checkpoint': str(float_ckpt),
         'qat_epochs': qat_epochs, 'max_train': max_train, 'max_val': max_val,
         'rows': rows}, indent=2) + '\n')
    write_report(out)
    return rows


def write_report(out):
    """Table and plot from ``results.json`` (also: ``--replot`` after editing nothing)."""
    out = Path(out)
    data = json.loads((out / 'results.json').read_text())
    rows, metric = data['rows'], data['metric']
    if not data.get('qat_epochs'):
        for r in rows:   # 0 QAT epochs: the QAT column is not a measurement
            r['qat'] = r['ptq'] if r['scheme'] == 'float' else None
    qat = any(r['qat'] is not None and r['scheme'] != 'float' for r in rows)
    head = f'| scheme | bits (w/a) | {metric} PTQ |' + (f' {metric} QAT |' if qat else '')
    lines = [head, '|---|---|---|' + ('---|' if qat else '')]
    for r in rows:
        bits_label = 'float32' if r['bits'] == 32 else f"{r['bits']}/{r['bits']}"
        cells = [r['scheme'], bits_label, f"{r['ptq']:.4f}"]
        if qat:
            cells.append(f"{r['qat']:.4f}" if r['qat'] is not None else 'n/a')
        lines.append('| ' + ' | '.join(cells) + ' |')
    (out / 'table.md').write_text('\n'.join(lines) + '\n')
    plot(rows, metric, out / 'bits.png')


def plot(rows, metric, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    float_value = next(r['ptq'] for r in rows if r['scheme'] == 'float')
    ax.axhline(float_value, color='k', lw=1, ls='--', label='float32')
    for scheme in sorted({r['scheme'] for r in rows} - {'float'}):
        pts = sorted((r['bits'], r['ptq'], r['qat']) for r in rows if r['scheme'] == scheme)
        if all(p[2] is not None for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], 'o-', label=f'{scheme} QAT')
        ax.plot([p[0] for p in pts], [p[1] for p in pts], 'x:', label=f'{scheme} PTQ')
    ax.set_xlabel('bits (weights = activations)')
    ax.set_ylabel(metric.upper() + (' (lower is better)' if metric == 'epe' else ''))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument('task', choices=['seg', 'flow'])
    p.add_argument('--float', default=None)
    p.add_argument('--replot', action='store_true', help='rewrite table and plot from '
                   'results.json in --out')
    p.add_argument('--out', required=True)
    p.add_argument('--bits', type=int, nargs='+', default=[8, 6, 5, 4, 3, 2])
    p.add_argument('--schemes', nargs='+', default=['ours'])
    p.add_argument('--qat-epochs', type=int, default=1)
    p.add_argument('--max-train', type=int, default=400)
    p.add_argument('--max-val', type=int, default=50)
    p.add_argument('--data', default='cache:/work/cache/train')
    p.add_argument('--val', default='cache:/work/cache/val')
    p.add_argument('--crop', type=int, nargs=2, default=[128, 256],
                   help='training crop (the study in docs/ was run with 128 256)')
    a = p.parse_args()
    if a.replot:
        write_report(a.out)
        return
    run(a.task, a.float, a.out, a.bits, a.schemes, a.qat_epochs, a.max_train, a.max_val,
        a.data, a.val, tuple(a.crop))


if __name__ == '__main__':
    main()
