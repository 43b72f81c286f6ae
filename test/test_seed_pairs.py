"""docs/scripts/seed_pairs.py: paired differences over seeds and the line between two points."""

import json

from helpers import docs_script
import pytest


@pytest.fixture(scope='module')
def seed_pairs():
    return docs_script('seed_pairs')


def _sweep(folder, seed, rows):
    folder.mkdir(parents=True)
    saved = {'metric': 'epe', 'settings': {'seed': seed},
             'rows': [{'name': n, 'test': t, 'model_size_bits': kib * 8 * 1024}
                      for n, (t, kib) in rows.items()]}
    (folder / 'results.json').write_text(json.dumps(saved))


def test_paired_differences_and_line(tmp_path, seed_pairs):
    # seed 0 in one folder; seed 1 split over two folders (merged); seed 2 lacks the candidate
    _sweep(tmp_path / 's0', 0, {'low': (3.0, 400), 'high': (2.0, 800), 'cand': (2.4, 500)})
    _sweep(tmp_path / 's1', 1, {'low': (3.2, 400), 'high': (2.2, 800)})
    _sweep(tmp_path / 's1b', 1, {'cand': (2.5, 600), 'high': (9.9, 800)})
    _sweep(tmp_path / 's2', 2, {'low': (3.0, 400), 'high': (2.0, 800)})
    by_seed = seed_pairs.load([tmp_path / f for f in ('s0', 's1', 's1b', 's2', 'missing')])
    assert by_seed[1]['high']['test'] == 2.2     # the first folder with a row wins
    entries = seed_pairs.compare(by_seed, 'cand', 'high', ('low', 'high'))
    assert [e['seed'] for e in entries] == [0, 1]
    assert entries[0]['diff'] == pytest.approx(0.4)
    assert entries[0]['line'] == pytest.approx(2.75)      # a quarter of the way from 400 KiB
    assert entries[0]['diff_line'] == pytest.approx(-0.35)
    assert entries[1]['line'] == pytest.approx(2.7)       # half way, seed 1's own end points
    assert entries[1]['diff_line'] == pytest.approx(-0.2)
    mean, se = seed_pairs.summary([e['diff_line'] for e in entries])
    assert mean == pytest.approx(-0.275)
    assert se == pytest.approx(0.075)


def test_means_over_seeds_and_plot(tmp_path, seed_pairs, capsys):
    _sweep(tmp_path / 's0', 0, {'low': (3.0, 400), 'cand': (2.4, 500)})
    _sweep(tmp_path / 's1', 1, {'low': (3.4, 400), 'cand': (2.6, 520)})   # other widths
    _sweep(tmp_path / 's2', 2, {'low': (3.2, 400)})
    points = seed_pairs.means(seed_pairs.load([tmp_path / 's0', tmp_path / 's1',
                                               tmp_path / 's2']), ['low', 'cand'])
    assert points[0][0] == 'low' and points[0][4] == 3
    assert points[0][2] == pytest.approx(3.2) and points[0][3] == pytest.approx(0.2 / 3 ** 0.5)
    assert points[1][1] == pytest.approx(510) and points[1][2] == pytest.approx(2.5)
    err = capsys.readouterr().err
    assert 'cand has sizes [500, 520]' in err and 'low' not in err
    seed_pairs.plot(points, 'epe', tmp_path / 'knee.png')
    assert (tmp_path / 'knee.png').stat().st_size > 10_000
    assert seed_pairs.short('retrained_learned_per_layer_size_0.4') == 'λ 0.4'
    assert seed_pairs.short('uniform_w3a8') == 'W3A8'


def test_warnings_and_errors(tmp_path, seed_pairs, capsys):
    rows = {'low': (3.0, 400), 'high': (2.0, 800), 'big': (1.9, 900), 'twin': (2.5, 400)}
    _sweep(tmp_path / 's0', 0, rows)
    _sweep(tmp_path / 's1', 1, {'low': (3.0, 400), 'high': (2.0, 800), 'big': (1.8, 950)})
    by_seed = seed_pairs.load([tmp_path / 's0', tmp_path / 's1'])
    entries = seed_pairs.compare(by_seed, 'big', 'high', ('low', 'high'))
    assert entries[0]['line'] == pytest.approx(1.75)          # extrapolated past 800 KiB
    err = capsys.readouterr().err
    assert 'big has sizes [900, 950]' in err and 'extrapolated' in err
    with pytest.raises(SystemExit, match='same size'):
        seed_pairs.compare(by_seed, 'big', 'high', ('low', 'twin'))
    (point,) = seed_pairs.means(by_seed, ['twin'])             # one seed: no standard error
    assert point[2] == 2.5 and point[4] == 1 and point[3] != point[3]
    seed_pairs.plot([point], 'epe', tmp_path / 'one.png')
    with pytest.raises(SystemExit, match='no sweep has a row nothing'):
        seed_pairs.means(by_seed, ['nothing'])


def test_line_on_the_bit_operation_axis(tmp_path, seed_pairs):
    rows = {'low': (3.0, 400), 'high': (2.0, 800), 'cand': (2.2, 500)}
    _sweep(tmp_path / 's0', 0, rows)
    saved = json.loads((tmp_path / 's0' / 'results.json').read_text())
    for row, gops in zip(saved['rows'], (10, 20, 18)):   # the candidate is cheap in size only
        row['bitops'] = gops * 1e9
    (tmp_path / 's0' / 'results.json').write_text(json.dumps(saved))
    by_seed = seed_pairs.load([tmp_path / 's0'])
    (size,) = seed_pairs.compare(by_seed, 'cand', 'high', ('low', 'high'))
    (ops,) = seed_pairs.compare(by_seed, 'cand', 'high', ('low', 'high'), axis='bitops')
    assert size['line'] == pytest.approx(2.75) and size['x'] == pytest.approx(500)
    assert ops['line'] == pytest.approx(2.2) and ops['x'] == pytest.approx(18)
    assert ops['diff_line'] == pytest.approx(0)
    (point,) = seed_pairs.means(by_seed, ['cand'], axis='bitops')
    assert point[1] == pytest.approx(18)
