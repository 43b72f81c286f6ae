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
        --sweeps docs/studies/flow_pareto_long docs/studies/flow_pareto_long_seed* \
                 docs/studies/flow_widths_seed0/seed*
"""

import argparse
import json
from pathlib import Path
import statistics


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


def kib(row):
    return row['model_size_bits'] / 8 / 1024


def compare(by_seed, name, against, line=None):
    """Per-seed rows (seed, size, test, reference, difference, line value, difference)."""
    out = []
    for seed in sorted(by_seed):
        rows = by_seed[seed]
        need = [name, against] + list(line or [])
        if any(n not in rows for n in need):
            continue
        row, ref = rows[name], rows[against]
        entry = {'seed': seed, 'size_kib': kib(row), 'test': row['test'], 'against': ref['test'],
                 'diff': row['test'] - ref['test']}
        if line:
            low, high = rows[line[0]], rows[line[1]]
            t = (kib(row) - kib(low)) / (kib(high) - kib(low))
            entry['line'] = low['test'] + t * (high['test'] - low['test'])
            entry['diff_line'] = row['test'] - entry['line']
        out.append(entry)
    return out


def summary(values):
    mean = statistics.mean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float('nan')
    return mean, se


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument('--sweeps', nargs='+', required=True, help='bits_pareto.py --out folders')
    p.add_argument('--row', required=True, help='candidate point, e.g. retrained_learned_...')
    p.add_argument('--against', required=True, help='reference point, e.g. uniform_w3a8')
    p.add_argument('--line', nargs=2, metavar=('LOW', 'HIGH'),
                   help='also compare with the line between these points at the size of --row')
    a = p.parse_args()
    entries = compare(load(a.sweeps), a.row, a.against, a.line)
    if not entries:
        raise SystemExit(f'no seed has all of {a.row}, {a.against}'
                         + (f', {a.line[0]}, {a.line[1]}' if a.line else ''))
    head = f'| seed | size (KiB) | {a.row} | {a.against} | difference |'
    if a.line:
        head += ' line | difference from the line |'
    print(head)
    print('|---' * (head.count('|') - 1) + '|')
    for e in entries:
        cells = [str(e['seed']), f"{e['size_kib']:.0f}", f"{e['test']:.4f}",
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
