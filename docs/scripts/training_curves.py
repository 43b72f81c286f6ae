"""
Validation curves of chained training runs, read from their checkpoints' metadata.

Each ``lane-seg train`` run writes ``RUN/NAME.json`` next to its checkpoint with the
validation metric after every epoch (``metrics.history``) and the exact command. Given the runs
of a chain in order (each one ``--init`` from the one before), this copies that metadata to
``--out`` (small JSON, kept in git) and draws one curve over the whole chain, a vertical line
where each run starts. Run from the repository root::

    .venv/bin/python docs/scripts/training_curves.py --metric iou \
        --runs /work/runs/lane_full20 /work/runs/lane_full36 \
        --out docs/studies/full_frame --name lane_curve
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def load_run(run: Path) -> dict:
    """Return the metadata JSON of a run folder (the one named after the folder)."""
    path = run / f'{run.name}.json'
    if not path.is_file():
        raise SystemExit(f'{path}: no run metadata (is {run} a lane-seg train output?)')
    return json.loads(path.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', nargs='+', type=Path, required=True, help='run folders, in order')
    p.add_argument('--metric', required=True, help='iou (lanes) or epe (flow)')
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--name', required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    xs, ys, starts = [], [], []
    for run in a.runs:
        meta = load_run(run)
        history = meta['metrics']['history']
        (a.out / f'{a.name}_{run.name}.json').write_text(json.dumps(
            {'command': meta['training']['command'], 'history': history}, indent=1) + '\n')
        offset = xs[-1] if xs else 0
        starts.append((offset, run.name))
        for h in history:
            if h['epoch'] == 0 and xs:
                continue   # the 'start' entry repeats the previous run's last value
            xs.append(offset + h['epoch'])
            ys.append(h[a.metric])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, ys, marker='o', ms=3)
    for x, name in starts:
        ax.axvline(x, color='grey', lw=0.8, ls='--')
        ax.text(x + 0.2, min(ys), name, fontsize=8, rotation=90, va='bottom')
    ax.set_xlabel('epoch (over the chain)')
    ax.set_ylabel(f'validation {a.metric}')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out / f'{a.name}.png', dpi=110)
    print(json.dumps({'epochs': xs, a.metric: ys,
                      'png': str(a.out / f'{a.name}.png')}))


if __name__ == '__main__':
    main()
