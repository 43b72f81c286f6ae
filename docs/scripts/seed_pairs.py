#!/usr/bin/env python3
"""
Paired comparison of two points of bits_pareto.py sweeps repeated over seeds.

Each ``--sweeps`` folder holds a ``results.json`` written by ``bits_pareto.py``; its seed is
the one in its settings, and several folders of one seed are merged (the first that has a row
wins). For every seed that has the candidate ``--row`` and the references, prints the test
metric of each, the difference ``row - against`` and, with ``--line LOW HIGH``, the difference
against the straight line between two reference points at the candidate's model size (the
uniform front where no uniform model of that size exists). Then the mean difference and its
standard error over the seeds (for EPE, negative means the candidate is better; for IoU,
positive).

Example (the flow knee in docs/learned_bits.md)::

    python docs/scripts/seed_pairs.py --row retrained_learned_per_layer_size_0.6 \
        --against uniform_w3a8 --line uniform_w2a8 uniform_w3a8 \
        --sweeps docs/studies/flow_pareto_long docs/studies/flow_widths_seed0/seed* \
                 docs/studies/flow_pareto_long_seed*

(the folders holding the seed-0 widths first: the first folder of a seed with a row wins).
"""

import argparse
import json
import math
from pathlib import Path
import statistics
import sys


def load(folders):
    """Return {seed: {row name: row}} merged over the sweeps' results.json files."""
    by_seed = {}
    for folder in folders:
        path = Path(folder) / 'results.json'
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        rows = by_seed.setdefault(saved['settings'].get('seed', 0), {})
        for row in saved['rows']:
            rows.setdefault(row['name'], row)
    return by_seed


AXES = {'size': ('size (KiB)', 'model size (KiB, weights only)'),
        'bitops': ('bit ops (G)', 'bit operations per frame (G)')}


def position(row, axis='size'):
    """Return where a row lies on the x axis: KiB of weights, or G bit operations."""
    return kib(row) if axis == 'size' else row['bitops'] / 1e9


def kib(row):
    return row['model_size_bits'] / 8 / 1024


def compare(by_seed, name, against, line=None, axis='size'):
    """Per-seed rows (seed, size, test, reference, difference, line value, difference)."""
    out = []
    _check_sizes(by_seed, name)
    need = [name, against] + list(line or [])
    for seed in sorted(by_seed):
        rows = by_seed[seed]
        if any(n not in rows for n in need):
            continue
        row, ref = rows[name], rows[against]
        entry = {'seed': seed, 'x': position(row, axis), 'test': row['test'],
                 'against': ref['test'], 'diff': row['test'] - ref['test']}
        if line:
            low, high = rows[line[0]], rows[line[1]]
            x_low, x_high = position(low, axis), position(high, axis)
            if x_high == x_low:
                raise SystemExit(f'--line: {line[0]} and {line[1]} lie at the same {axis}')
            t = (position(row, axis) - x_low) / (x_high - x_low)
            if not 0 <= t <= 1:
                print(f'warning: seed {seed}: {name} lies outside {line[0]}..{line[1]}, '
                      'the line is extrapolated', file=sys.stderr)
            entry['line'] = low['test'] + t * (high['test'] - low['test'])
            entry['diff_line'] = row['test'] - entry['line']
        out.append(entry)
    return out


def _check_sizes(by_seed, name):
    """Warn when point ``name`` has other sizes (other widths) in other seeds."""
    sizes = sorted({round(kib(r[name])) for r in by_seed.values() if name in r})
    if len(sizes) > 1:
        print(f'warning: {name} has sizes {sizes} KiB over the seeds (other widths)',
              file=sys.stderr)


def summary(values):
    """Return the mean and its standard error (NaN for one value)."""
    mean = statistics.mean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float('nan')
    return mean, se


def means(by_seed, names, axis='size'):
    """
    Per point: (name, mean size in KiB, mean test metric, its standard error, seeds).

    A point whose size differs between the seeds was trained at other widths in some of them
    (another seed's learned widths): a warning names it. The first folder of ``--sweeps``
    with a row wins, so list the folders whose widths are wanted first.
    """
    out = []
    for name in names:
        rows = [r[name] for r in by_seed.values() if name in r]
        if not rows:
            raise SystemExit(f'--points: no sweep has a row {name}')
        mean, se = summary([r['test'] for r in rows])
        _check_sizes(by_seed, name)
        out.append((name, statistics.mean(position(r, axis) for r in rows), mean, se,
                    len(rows)))
    return out


def short(name):
    """Return a plot label: W3A8, λ 0.4 (retrained at its widths), or a hand-set point's."""
    if name.startswith('uniform_'):
        return name[len('uniform_'):].upper()
    if name.startswith('set_'):
        return name[len('set_'):]
    parts = name.rsplit('_', 2)
    if 'learned_per_layer' in name and len(parts) == 3:
        return ('' if name.startswith('retrained_') else 'search ') + f'λ {parts[2]}'
    return name


def plot(points, metric, path, axis='size'):
    """Draw the mean test metric of each point against its size, with one standard error."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    uniform = sorted((p for p in points if p[0].startswith('uniform')), key=lambda p: p[1])
    if uniform:
        ax.plot([p[1] for p in uniform], [p[2] for p in uniform], color='tab:cyan', ls='--',
                label='uniform front (straight lines)')
    seen = set()
    for i, (name, size, mean, se, n) in enumerate(sorted(points, key=lambda p: p[1])):
        kind = ('uniform' if name.startswith('uniform') else
                'widths set by hand' if name.startswith('set_') else
                'retrained at learned widths' if name.startswith('retrained_') else 'other')
        color = {'uniform': 'tab:cyan', 'widths set by hand': 'tab:olive',
                 'retrained at learned widths': 'tab:brown'}.get(kind, 'tab:gray')
        ax.errorbar(size, mean, yerr=None if math.isnan(se) else se,   # one seed: no bar
                    marker='o', color=color, capsize=3,
                    label=kind if kind not in seen else None)
        seen.add(kind)
        ax.annotate(f'{short(name)} [{n}]', (size, mean), fontsize=7,
                    xytext=(5, 4 if i % 2 else -10), textcoords='offset points')
    ax.set_xlabel(AXES[axis][1])
    ax.set_ylabel(f'test {metric.upper()}, mean over [seeds] ± SE')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument('--sweeps', nargs='+', required=True, help='bits_pareto.py --out folders')
    p.add_argument('--row', required=True, help='candidate point, e.g. retrained_learned_...')
    p.add_argument('--against', required=True, help='reference point, e.g. uniform_w3a8')
    p.add_argument('--line', nargs=2, metavar=('LOW', 'HIGH'),
                   help='also compare with the line between these points at the --axis '
                   'position of --row')
    p.add_argument('--axis', choices=sorted(AXES), default='size',
                   help='x axis of the line and the figure: model size or bit operations')
    p.add_argument('--points', nargs='+', metavar='NAME',
                   help='print (and with --plot, draw) the mean over seeds of these points')
    p.add_argument('--plot', metavar='PNG', help='figure of --points: mean ± SE against size')
    a = p.parse_args()
    by_seed = load(a.sweeps)
    if a.points:
        points = means(by_seed, a.points, a.axis)
        print(f'| point | {AXES[a.axis][0]} | test mean | SE | seeds |\n|---|---|---|---|---|')
        for name, size, mean, se, n in points:
            print(f'| {name} | {size:.1f} | {mean:.4f} | {se:.4f} | {n} |')
        print()
        if a.plot:
            metric = 'epe'
            for folder in a.sweeps:
                if (Path(folder) / 'results.json').exists():
                    metric = json.loads((Path(folder) / 'results.json').read_text())['metric']
                    break
            plot(points, metric, a.plot, a.axis)
    entries = compare(by_seed, a.row, a.against, a.line, a.axis)
    if not entries:
        raise SystemExit(f'no seed has all of {a.row}, {a.against}'
                         + (f', {a.line[0]}, {a.line[1]}' if a.line else ''))
    head = f'| seed | {AXES[a.axis][0]} | {a.row} | {a.against} | difference |'
    if a.line:
        head += ' line | difference from the line |'
    print(head)
    print('|---' * (head.count('|') - 1) + '|')
    for e in entries:
        cells = [str(e['seed']), f"{e['x']:.1f}", f"{e['test']:.4f}",
                 f"{e['against']:.4f}", f"{e['diff']:+.4f}"]
        if a.line:
            cells += [f"{e['line']:.4f}", f"{e['diff_line']:+.4f}"]
        print('| ' + ' | '.join(cells) + ' |')
    mean, se = summary([e['diff'] for e in entries])
    print(f'\n{a.row} - {a.against}: {mean:+.4f} ± {se:.4f} (mean ± SE, {len(entries)} seeds)')
    if a.line:
        mean, se = summary([e['diff_line'] for e in entries])
        print(f'{a.row} - line {a.line[0]}..{a.line[1]}: {mean:+.4f} ± {se:.4f}')


if __name__ == '__main__':
    main()
