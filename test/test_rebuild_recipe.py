"""
docs/scripts/rebuild_models.sh, the recipe of every shipped model, stays runnable.

The script takes hours, so CI does not run it; instead every ``lane-seg`` command in it must
parse with the real command-line parser (a renamed or removed option fails here), and every
run folder a command starts from (``--init``, ``--float``, ``--int8``, ``--layer-bits``) must
be written by an earlier command of the script (``--out``): the order of the recipe holds.
"""

import re
import shlex

from helpers import REPO
import pytest

SCRIPT = REPO / 'docs' / 'scripts' / 'rebuild_models.sh'
INPUTS = ('--init', '--float', '--int8', '--layer-bits')


def logical_lines(text):
    """Return the script's lines with backslash continuations joined."""
    return text.replace('\\\n', ' ').splitlines()


def expand(line, env):
    """Expand ``$NAME`` and ``${NAME:-default}`` from ``env`` (unknown names fail)."""
    def value(match):
        name = match.group(1) or match.group(2)
        if name not in env:
            raise KeyError(f'{SCRIPT.name}: ${name} is not set in the script')
        return env[name]
    return re.sub(r'\$\{(\w+)(?::-[^}]*)?\}|\$(\w+)', value, line)


def commands(text):
    """Return the argv (after ``lane-seg``) of every lane-seg command, in order."""
    env, out = {}, []
    for line in logical_lines(text):
        assignment = re.match(r'^(\w+)=(.*)$', line)
        if assignment:
            name, raw = assignment.groups()
            default = re.fullmatch(r'\$\{\w+:-(.*)\}', raw)
            env[name] = default.group(1) if default else ' '.join(shlex.split(expand(raw, env)))
        elif line.startswith('$BIN/lane-seg '):
            out.append(shlex.split(expand(line, env))[1:])
    return out


def test_reads_the_commands_and_expands_variables():
    text = ('BIN=.venv/bin\nRUNS=${RUNS:-/r}\nX="--crop 1 2 \\\n  --lr 1e-4"\n'
            '$BIN/lane-seg train seg $X --out $RUNS/a\n$BIN/python -c pass\n')
    assert commands(text) == [['train', 'seg', '--crop', '1', '2', '--lr', '1e-4',
                               '--out', '/r/a']]
    with pytest.raises(KeyError, match='NOPE'):
        commands('BIN=b\n$BIN/lane-seg train seg --out $NOPE\n')


def test_every_command_parses():
    from lane_seg.cli import build_parser
    found = commands(SCRIPT.read_text())
    assert len(found) >= 30, 'the recipe lost its commands'
    parser = build_parser()
    for argv in found:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f'{SCRIPT.name}: lane-seg {shlex.join(argv)} does not parse')


def run_folder(path, runs):
    """Return the run folder ``path`` lies in under ``runs``, or None for a path elsewhere."""
    prefix = runs.rstrip('/') + '/'
    return path[len(prefix):].split('/')[0] if path.startswith(prefix) else None


def unmade_runs(found, runs):
    """Return (command, run) for each run folder read before a command of ``found`` writes it."""
    written, missing = set(), []
    for argv in found:
        for flag, path in zip(argv, argv[1:]):
            run = run_folder(path, runs) if flag in INPUTS else None
            if run is not None and run not in written:
                missing.append((shlex.join(argv[:2]), run))
        if '--out' in argv:
            written.add(run_folder(argv[argv.index('--out') + 1], runs))
    return missing


def test_a_run_read_before_it_is_made_is_found():
    found = [['train', 'seg', '--init', '/r/a/a.safetensors', '--out', '/r/b'],
             ['train', 'seg', '--out', '/r/a'],
             ['export', 'seg', '--float', '/r/a/a.safetensors', '--int8', '/r/b/b.safetensors',
              '--out', 'models']]
    assert unmade_runs(found, '/r') == [('train seg', 'a')]


def test_every_run_it_starts_from_is_made_before():
    text = SCRIPT.read_text()
    runs = re.search(r'^RUNS=\$\{RUNS:-(.*)\}$', text, re.MULTILINE).group(1)
    found = commands(text)
    reads = [path for argv in found for flag, path in zip(argv, argv[1:])
             if flag in INPUTS and run_folder(path, runs)]
    assert len(reads) >= 30, f'the recipe reads few runs under {runs}'
    assert unmade_runs(found, runs) == []
