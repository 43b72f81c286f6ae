"""
Learned bit widths against uniform QAT (issue 8): train the sweep, evaluate, draw the fronts.

Every point starts from the same float checkpoint and gets the same QAT budget (``--epochs``
over the first ``--max-train`` training samples, learning rate ``--lr``): uniform QAT at
8/6/4/2 bits, the study's learned uniform width (``sum_bits``, lambda 0.97, alpha 4) and
per-layer learned widths for each hardware loss over a sweep of lambda. Each run is the
``lane-seg train`` command printed in the log (skipped when its checkpoint exists, so the
sweep resumes); every checkpoint is then scored on the held-out test set with
``lane-seg eval`` and measured with ``hardware_cost`` (model size = weights x weight bits,
bit operations = MACs x weight bits x input bits, at the deployed input size). Run from the
repository root::

    .venv/bin/python docs/scripts/bits_pareto.py seg \
        --float /work/runs/lane_unet_fp32_ft800/lane_unet_fp32_ft800.safetensors \
        --test /work/testset --out docs/studies/lane_pareto

Writes ``results.json``, ``table.md``, ``widths.md`` and ``pareto.png`` into ``--out``;
the run folders go to ``--out/runs`` (ignored by git). ``--only`` picks points of the sweep,
``--extra`` adds options to every quantized run (``--weight-clip mse``), ``--seed`` sets the
training seed; ``--combine OUT1 OUT2 ...`` then writes ``spread.md`` (mean and range of each
point over the repeated sweeps) into ``--out``.
"""

import argparse
import json
from pathlib import Path
import shlex
import subprocess
import sys

BIN = Path(sys.executable).parent
METRIC = {'seg': 'iou', 'flow': 'epe'}
# settings that may differ between the calls whose points share one results.json
MERGE_FREE = ('only', 'retrain_learned', 'widths_from', 'set_widths')


def sweep(a):
    """Return the run list: (name, extra train arguments, description fields)."""
    runs = [('float', None, {'kind': 'float'}),
            # the float model given the same fine-tuning budget as every QAT run: separates
            # what quantization costs from what the extra training brings
            ('float_finetuned', [], {'kind': 'float, same fine-tuning'})]
    for b in a.ptq_bits:   # calibration only: no training (epochs 0)
        runs.append((f'ptq_w{b}a{b}', ['--quant-bits', str(b), '--epochs', '0'],
                     {'kind': 'uniform PTQ', 'bits': b}))
    for b in a.uniform_bits:
        runs.append((f'uniform_w{b}a{b}', ['--quant-bits', str(b)],
                     {'kind': 'uniform QAT', 'bits': b}))
    for b in a.weight_only_bits:   # the same model size as W{b}A{b}, 8-bit activations
        runs.append((f'uniform_w{b}a8', ['--quant-bits', str(b), '--act-bits', '8'],
                     {'kind': 'uniform QAT, 8-bit activations', 'bits': b}))
    bits_args = ['--bits-every', str(a.bits_every), '--bits-optimizer', a.bits_optimizer,
                 '--bits-lr', str(a.bits_lr), '--bits-alpha', str(a.alpha)]
    runs.append(('learned_uniform_sum_bits_0.97',
                 ['--quant-bits', '8', '--learn-bits', 'uniform', '--bits-hardware', 'sum_bits',
                  '--bits-lambda', '0.97'] + bits_args,
                 {'kind': 'learned uniform', 'hardware': 'sum_bits', 'lambda': 0.97}))
    for hw in a.hardware:
        for lam in a.lambdas:
            extra = ['--quant-bits', '8', '--learn-bits', 'per_layer', '--bits-hardware', hw,
                     '--bits-lambda', str(lam)] + bits_args
            runs.append((f'learned_per_layer_{hw}_{lam}', extra,
                         {'kind': 'learned per layer', 'hardware': hw, 'lambda': lam}))
    if a.retrain_learned:   # QAT from float at the widths a learned run found
        for name, _, desc in [r for r in runs if r[2]['kind'] == 'learned per layer']:
            runs.append((f'retrained_{name}', ['--quant-bits', '8', '--layer-bits', name],
                         dict(desc, kind='retrained at learned widths', source=name)))
    labels = set()
    for spec in a.set_widths:   # controls: QAT from float at widths set by hand
        label, _, path = spec.partition('=')
        if not (label and path and Path(path).is_file()) or '/' in label or label in labels:
            raise SystemExit(f'--set-widths {spec}: expected NAME=FILE with an existing FILE '
                             'and a NAME that is unique and has no "/"')
        labels.add(label)
        runs.append((f'set_{label}', ['--quant-bits', '8', '--layer-bits', path],
                     {'kind': 'widths set by hand', 'label': label, 'source': path}))
    if a.only:
        known = {name for name, _, _ in runs}
        unknown = sorted(set(a.only) - known)
        if unknown:
            raise SystemExit(f'--only: no run named {", ".join(unknown)} in this sweep; '
                             f'runs: {", ".join(sorted(known))}')
        runs = [r for r in runs if r[0] in a.only]
    return runs


def widths_file(a, source, runs_dir):
    """
    Return a file holding the widths of ``source``: a learned run's name, or a file.

    For a learned run: its checkpoint when present, else its ``layer_bits`` in
    ``results.json`` (the run folders are not kept in git), copied to
    ``runs/SOURCE.layer_bits.json``; both are looked up in ``--widths-from`` (another sweep:
    another seed's widths), by default ``--out``. A file (widths set by hand,
    ``--set-widths``) is returned as it is.
    """
    if Path(source).is_file():   # widths set by hand (--set-widths)
        return Path(source)
    where = Path(a.widths_from or a.out)
    ckpt = where / 'runs' / source / f'{source}.safetensors'
    if ckpt.exists():
        return ckpt
    saved = where / 'results.json'
    rows = json.loads(saved.read_text())['rows'] if saved.exists() else []
    widths = next((r['layer_bits'] for r in rows if r['name'] == source), None)
    if not widths:
        raise SystemExit(f'retrained_{source}: neither {ckpt} nor a {source} row in {saved}: '
                         f'run {source} first')
    path = runs_dir / f'{source}.layer_bits.json'
    path.write_text(json.dumps(widths, indent=1) + '\n')
    return path


def train(a, name, extra, runs_dir):
    out = runs_dir / name
    ckpt = out / f'{name}.safetensors'
    if extra and '--layer-bits' in extra:   # the learned run's name -> its widths
        i = extra.index('--layer-bits') + 1
        extra = extra[:i] + [str(widths_file(a, extra[i], runs_dir))] + extra[i + 1:]
        if ckpt.exists():   # a run kept from an earlier call must have these widths
            from lane_seg.models.bitwidth import read_layer_bits
            if read_layer_bits(ckpt) != read_layer_bits(extra[i]):
                raise SystemExit(f'{ckpt} was trained at other widths than {extra[i]} '
                                 f'(another --widths-from?): remove it or use another --out')
    if ckpt.exists():
        return ckpt
    cmd = [str(BIN / 'lane-seg'), 'train', a.task, '--init', a.float, '--out', str(out),
           '--max-val', str(a.max_val), '--data', a.data, '--val', a.val,
           '--crop', *map(str, a.crop)]
    if extra is None:    # the float reference: evaluation only
        cmd += ['--epochs', '0']
    elif '--epochs' in extra:   # PTQ: calibration only
        cmd += extra
    else:
        cmd += ['--epochs', str(a.epochs), '--max-train', str(a.max_train), '--lr', str(a.lr)]
        cmd += extra
    if extra and '--quant-bits' in extra:   # quantized runs: the shared low-bit options
        cmd += shlex.split(a.extra)
    if extra is not None and '--epochs' not in extra:   # every trained run
        cmd += ['--seed', str(a.seed)]
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return ckpt


def evaluate(a, ckpt):
    cmd = [str(BIN / 'lane-seg'), 'eval', a.task, '--model', str(ckpt), '--data', a.test,
           '--backend', 'torch', '--json']
    if a.limit:
        cmd += ['--limit', str(a.limit)]
    print('$ ' + ' '.join(cmd), flush=True)
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def hardware(ckpt):
    from lane_seg.models import checkpoint
    from lane_seg.models.bitwidth import hardware_cost
    from lane_seg.models.layers import count_macs
    model, meta = checkpoint.load_model(ckpt)
    shape = [1] + list(meta['inputs'][0]['shape'][1:])
    quant = meta.get('quantization', {})
    if not meta['architecture'].get('quant'):
        params = sum(p.numel() for n, p in model.named_parameters()
                     if p.dim() > 1)   # conv weights, as hardware_cost counts them
        macs = count_macs(model, shape)
        return {'model_size_bits': 32 * params, 'bitops': 32 * 32 * macs, 'macs': macs,
                'weight_params': params}, meta, quant
    cost = hardware_cost(model, shape)
    from lane_seg.models.quant import QConv2d
    cost['weight_params'] = sum(m.weight.numel() for m in model.modules()
                                if isinstance(m, QConv2d))
    return cost, meta, quant


def run(a):
    out = Path(a.out)
    runs_dir = out / 'runs'
    runs_dir.mkdir(parents=True, exist_ok=True)
    metric = METRIC[a.task]
    rows = []
    for name, extra, desc in sweep(a):
        ckpt = train(a, name, extra, runs_dir)
        cost, meta, quant = hardware(ckpt)
        result = evaluate(a, ckpt)
        if desc['kind'] == 'retrained at learned widths':
            desc = dict(desc, widths_from=str(a.widths_from or a.out))
        row = dict(desc, name=name, **cost,
                   val=meta['metrics']['val'][metric],
                   test=result[metric],
                   layer_bits=quant.get('layer_bits'))
        row['mean_weight_bits'] = row['model_size_bits'] / row['weight_params']
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != 'layer_bits'}), flush=True)
    settings = {k: getattr(a, k) for k in ('task', 'float', 'test', 'epochs', 'max_train',
                                           'lr', 'max_val', 'bits_every', 'bits_optimizer',
                                           'bits_lr', 'alpha', 'limit', 'data', 'val',
                                           'crop', 'extra', 'only', 'seed', 'retrain_learned',
                                           'widths_from', 'set_widths')}
    saved = out / 'results.json'
    if a.only and saved.exists():   # keep the points this call did not run
        before = json.loads(saved.read_text())
        differ = [k for k, v in before['settings'].items()
                  if k not in MERGE_FREE and k in settings and settings[k] != v]
        if differ:
            raise SystemExit(f'{saved} holds a sweep run with other settings '
                             f'({", ".join(differ)}): use another --out')
        new = {r['name']: r for r in rows}
        rows = [new.pop(r['name'], r) for r in before['rows']] + list(new.values())
        settings['only'] = [r['name'] for r in rows]
    (out / 'results.json').write_text(json.dumps({'metric': metric, 'settings': settings,
                                                  'rows': rows}, indent=1) + '\n')
    report(out)


def _label(r):
    if r['kind'] == 'float':
        return 'float32'
    if r['kind'] == 'float, same fine-tuning':
        return 'float32, same fine-tuning as QAT'
    if r['kind'] == 'uniform QAT':
        return f"uniform QAT W{r['bits']}A{r['bits']}"
    if r['kind'] == 'uniform PTQ':
        return f"uniform PTQ W{r['bits']}A{r['bits']}"
    if r['kind'] == 'uniform QAT, 8-bit activations':
        return f"uniform QAT W{r['bits']}A8"
    if r['kind'] == 'retrained at learned widths':
        return f"retrained at the widths of learned {r['hardware']} λ {r['lambda']}"
    if r['kind'] == 'widths set by hand':
        return f"widths set by hand: {r['label']}"
    return f"{r['kind']}, {r['hardware']}, λ {r['lambda']}"


def _act_mean(r):
    if r['layer_bits']:
        acts = list(r['layer_bits']['activations'].values())
        return sum(acts) / len(acts)
    if r['kind'] == 'uniform QAT, 8-bit activations':
        return 8
    return {'float': 32, 'float, same fine-tuning': 32}.get(r['kind'], r.get('bits'))


def report(out):
    out = Path(out)
    data = json.loads((out / 'results.json').read_text())
    rows, metric = data['rows'], data['metric']
    float_row = next((r for r in rows if r['kind'] == 'float'), None)   # --only without it
    lines = [f'| model | mean W bits | mean A bits | size (KiB) | size / float | '
             f'bit operations (G) | val {metric} | test {metric} | front |',
             '|---|---|---|---|---|---|---|---|---|']
    better = (lambda x, y: x >= y) if metric == 'iou' else (lambda x, y: x <= y)
    for r in rows:
        # on the Pareto front (size, test metric): no other point at most as large and better
        dominated = any(o is not r and o['model_size_bits'] <= r['model_size_bits']
                        and better(o['test'], r['test'])
                        and (o['model_size_bits'] < r['model_size_bits']
                             or o['test'] != r['test']) for o in rows)
        lines.append('| ' + ' | '.join([
            _label(r), f"{r['mean_weight_bits']:.2f}", f'{_act_mean(r):.2f}',
            f"{r['model_size_bits'] / 8 / 1024:.0f}",
            f"1/{float_row['model_size_bits'] / r['model_size_bits']:.1f}" if float_row else '',
            f"{r['bitops'] / 1e9:.0f}", f"{r['val']:.4f}", f"{r['test']:.4f}",
            '' if dominated else 'yes']) + ' |')
    (out / 'table.md').write_text('\n'.join(lines) + '\n')
    learned = [r for r in rows if r['layer_bits'] and r['kind'] == 'learned per layer']
    if learned:
        layers = list(learned[0]['layer_bits']['weights'])
        acts = list(learned[0]['layer_bits']['activations'])
        head = '| layer | ' + ' | '.join(f"{r['hardware']} λ {r['lambda']}" for r in learned)
        w = [head + ' |', '|---|' + '---|' * len(learned)]
        w += ['| W ' + n + ' | ' + ' | '.join(str(r['layer_bits']['weights'][n])
                                              for r in learned) + ' |' for n in layers]
        w += ['| A ' + n + ' | ' + ' | '.join(str(r['layer_bits']['activations'][n])
                                              for r in learned) + ' |' for n in acts]
        (out / 'widths.md').write_text('\n'.join(w) + '\n')
    plot(rows, metric, out / 'pareto.png')


def combine(outs, out):
    """Mean and range of each point's test metric over repeated sweeps (other seeds)."""
    sweeps = [json.loads((Path(o) / 'results.json').read_text()) for o in outs]
    metric = sweeps[0]['metric']
    names = list(dict.fromkeys(r['name'] for s in sweeps for r in s['rows']))
    lines = [f'| model | size (KiB) | test {metric}: mean | min | max | runs (seeds) |',
             '|---|---|---|---|---|---|']
    for name in names:
        found = [(s['settings'].get('seed', 0), r) for s in sweeps for r in s['rows']
                 if r['name'] == name]
        tests = [r['test'] for _, r in found]
        sizes = sorted({round(r['model_size_bits'] / 8 / 1024) for _, r in found})
        size = str(sizes[0]) if len(sizes) == 1 else f'{sizes[0]}-{sizes[-1]}'
        lines.append('| ' + ' | '.join([
            _label(found[0][1]), size,
            f'{sum(tests) / len(tests):.4f}', f'{min(tests):.4f}', f'{max(tests):.4f}',
            f"{len(tests)} ({', '.join(str(seed) for seed, _ in found)})"]) + ' |')
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / 'spread.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def plot(rows, metric, path):
    """Accuracy against model size and bit operations; the second row zooms in on float."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4), dpi=110)
    styles = {'float': ('k', '*'), 'float, same fine-tuning': ('k', 'P'),
              'uniform QAT': ('tab:blue', 'o'),
              'uniform QAT, 8-bit activations': ('tab:cyan', 'D'),
              'uniform PTQ': ('tab:gray', 'x'),
              'learned uniform': ('tab:green', 's'),
              'retrained at learned widths': ('tab:brown', 'v'),
              'widths set by hand': ('tab:olive', 'X')}
    hw_colors = {'size': 'tab:red', 'bitops': 'tab:purple', 'sum_bits': 'tab:orange'}
    refs = ([r['test'] for r in rows if r['kind'].startswith('float')]
            or [r['test'] for r in rows])   # no float point in this sweep: zoom on its own
    zoom = ((min(refs) - 0.04, max(refs) + 0.012) if metric == 'iou'
            else (min(refs) * 0.9, max(refs) * 1.45))
    for row, limits in ((0, None), (1, zoom)):
        for ax, key, label in ((axes[row][0], 'model_size_bits',
                                'model size (KiB, weights only)'),
                               (axes[row][1], 'bitops', 'bit operations per frame (G)')):
            _draw(ax, rows, key, label, metric, styles, hw_colors, limits)
    axes[0][0].legend(fontsize=8)
    axes[1][0].set_title(f'zoom: test {metric.upper()} near float', fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _draw(ax, rows, key, label, metric, styles, hw_colors, limits):
    scale = 8 * 1024 if key == 'model_size_bits' else 1e9
    groups = {}
    for r in rows:
        g = r['kind'] if r['kind'] != 'learned per layer' else f"per layer, {r['hardware']}"
        groups.setdefault(g, []).append(r)
    for g, rs in groups.items():
        rs = sorted(rs, key=lambda r: r[key])
        if g.startswith('per layer'):
            color, marker = hw_colors[rs[0]['hardware']], '^'
        else:
            color, marker = styles[g]
        ax.plot([r[key] / scale for r in rs], [r['test'] for r in rs], marker=marker,
                color=color, ls='-' if len(rs) > 1 else '', label=g)
        for r in rs:
            tag = (f"{r['bits']}b" if r['kind'].startswith('uniform') else
                   f"λ{r['lambda']}" if 'lambda' in r else '')
            inside = limits is None or limits[0] <= r['test'] <= limits[1]
            if tag and inside:
                ax.annotate(tag, (r[key] / scale, r['test']), fontsize=7,
                            xytext=(3, 3), textcoords='offset points')
    ax.set_xscale('log')
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_xlabel(label)
    ax.set_ylabel(f'test {metric.upper()}' + (' (lower is better)' if metric == 'epe' else ''))
    ax.grid(alpha=0.3, which='both')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument('task', choices=['seg', 'flow'])
    p.add_argument('--float', help='float checkpoint every run starts from')
    p.add_argument('--test', help='held-out test folder (lane-seg eval --data)')
    p.add_argument('--out', required=True)
    p.add_argument('--replot', action='store_true', help='table and plot from results.json')
    p.add_argument('--uniform-bits', type=int, nargs='*', default=[8, 6, 4, 2])
    p.add_argument('--ptq-bits', type=int, nargs='*', default=[8, 6, 4],
                   help='uniform PTQ (calibration only) at these widths')
    p.add_argument('--weight-only-bits', type=int, nargs='*', default=[4, 3, 2],
                   help='uniform QAT of the weights at these widths, activations at 8 bits')
    p.add_argument('--hardware', nargs='*', default=['size', 'bitops'])
    p.add_argument('--only', nargs='+', metavar='NAME',
                   help='run only these points of the sweep (names as in the run folders, '
                   'e.g. float uniform_w4a8 learned_per_layer_size_0.97)')
    p.add_argument('--extra', default='', metavar='ARGS',
                   help='options added to every quantized run, e.g. "--weight-clip mse"')
    p.add_argument('--retrain-learned', action='store_true',
                   help='add, for each learned per-layer point, QAT from the float model at '
                   'the widths it learned (retrained_<name>; same budget as the uniform runs)')
    p.add_argument('--set-widths', nargs='+', default=[], metavar='NAME=FILE',
                   help='add QAT from the float model at the per-layer widths of FILE (JSON: '
                   '{"weights": {layer: bits}, "activations": {quantizer: bits}}), as point '
                   'set_NAME: hand-made controls for the learned widths')
    p.add_argument('--widths-from', metavar='OUT',
                   help='--retrain-learned takes the widths of the learned runs of this sweep '
                   '(another seed, say) instead of those of --out')
    p.add_argument('--lambdas', type=float, nargs='+', default=[0.9, 0.97, 0.99, 0.997])
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--max-train', type=int, default=800)
    p.add_argument('--lr', type=float, default=5e-5)
    p.add_argument('--max-val', type=int, default=50)
    p.add_argument('--bits-every', type=int, default=4)
    p.add_argument('--bits-optimizer', default='adam')
    p.add_argument('--bits-lr', type=float, default=0.15)
    p.add_argument('--alpha', type=float, default=4.0)
    p.add_argument('--limit', type=int, default=0, help='first N test frames only')
    p.add_argument('--data', default='cache:/work/cache/train')
    p.add_argument('--val', default='cache:/work/cache/val')
    p.add_argument('--crop', type=int, nargs=2, default=[128, 256],
                   help='training crop (the studies in docs/ were run with 128 256)')
    p.add_argument('--seed', type=int, default=0,
                   help='training seed of every trained run (repeat the sweep with other '
                   'seeds into other --out folders, then --combine them)')
    p.add_argument('--combine', nargs='+', metavar='OUT',
                   help='only write --out/spread.md: per point, the mean and range over these '
                   'sweeps (results.json of each; the same points, different --seed)')
    a = p.parse_args()
    if a.combine:
        combine(a.combine, a.out)
        return
    if a.replot:
        report(a.out)
    else:
        run(a)


if __name__ == '__main__':
    main()
