"""docs/scripts/bits_pareto.py: the run list of a sweep, hand-set widths and learned widths."""

import json
from types import SimpleNamespace

from helpers import docs_script
import pytest


@pytest.fixture(scope='module')
def bp():
    return docs_script('bits_pareto')


def _args(tmp_path, **kw):
    base = {'ptq_bits': [], 'uniform_bits': [], 'weight_only_bits': [3], 'bits_every': 2,
            'bits_optimizer': 'adam', 'bits_lr': 0.15, 'alpha': 4.0, 'hardware': ['size'],
            'lambdas': [0.4], 'retrain_learned': True, 'set_widths': [], 'only': None,
            'out': str(tmp_path / 'sweep'), 'widths_from': None}
    base.update(kw)
    return SimpleNamespace(**base)


def test_sweep_runs_and_hand_set_widths(tmp_path, bp):
    widths = tmp_path / 'w2.json'
    widths.write_text(json.dumps({'weights': {'head': 8}}))
    runs = {name: (extra, desc) for name, extra, desc in
            bp.sweep(_args(tmp_path, set_widths=[f'w2={widths}']))}
    assert runs['uniform_w3a8'][0] == ['--quant-bits', '3', '--act-bits', '8']
    assert runs['learned_per_layer_size_0.4'][0][:6] == [
        '--quant-bits', '8', '--learn-bits', 'per_layer', '--bits-hardware', 'size']
    assert runs['retrained_learned_per_layer_size_0.4'][0] == [
        '--quant-bits', '8', '--layer-bits', 'learned_per_layer_size_0.4']
    assert runs['set_w2'] == (['--quant-bits', '8', '--layer-bits', str(widths)],
                              {'kind': 'widths set by hand', 'label': 'w2',
                               'source': str(widths)})
    assert bp._label(dict(runs['set_w2'][1])) == 'widths set by hand: w2'
    for bad in ([f'w2={widths}', f'w2={widths}'], ['w2=missing.json'], [f'a/b={widths}'],
                [str(widths)]):
        with pytest.raises(SystemExit, match='--set-widths'):
            bp.sweep(_args(tmp_path, set_widths=bad))
    with pytest.raises(SystemExit, match='no run named nothing'):
        bp.sweep(_args(tmp_path, only=['nothing']))


def test_widths_file_sources(tmp_path, bp):
    a = _args(tmp_path)
    runs_dir = tmp_path / 'sweep' / 'runs'
    runs_dir.mkdir(parents=True)
    hand = tmp_path / 'hand.json'
    hand.write_text('{}')
    assert bp.widths_file(a, str(hand), runs_dir) == hand      # a file: used as it is
    with pytest.raises(SystemExit, match='run learned_per_layer_size_0.4 first'):
        bp.widths_file(a, 'learned_per_layer_size_0.4', runs_dir)
    learned = {'weights': {'head': 8, 'downs.0.0.0': 2}, 'activations': {'q_in': 8}}
    (tmp_path / 'sweep' / 'results.json').write_text(json.dumps(
        {'rows': [{'name': 'learned_per_layer_size_0.4', 'layer_bits': learned}]}))
    path = bp.widths_file(a, 'learned_per_layer_size_0.4', runs_dir)
    assert json.loads(path.read_text()) == learned            # from the sweep's results.json


def test_report_without_a_float_point(tmp_path, bp):
    """A sweep called with --only and no float point still gets its table and plot."""
    widths = {'weights': {'head': 8, 'downs.0.0.0': 2}, 'activations': {'q_in': 8}}
    rows = [{'kind': 'retrained at learned widths', 'hardware': 'size', 'lambda': 0.4,
             'name': 'retrained_learned_per_layer_size_0.4', 'model_size_bits': 8 * 1024 * 550,
             'bitops': 31e9, 'weight_params': 1000, 'mean_weight_bits': 2.4, 'val': 2.6,
             'test': 2.01, 'layer_bits': widths},
            {'kind': 'uniform QAT, 8-bit activations', 'bits': 3, 'name': 'uniform_w3a8',
             'model_size_bits': 8 * 1024 * 690, 'bitops': 20e9, 'weight_params': 1000,
             'mean_weight_bits': 3.0, 'val': 2.5, 'test': 2.13, 'layer_bits': None}]
    (tmp_path / 'results.json').write_text(json.dumps({'metric': 'epe', 'rows': rows}))
    bp.report(tmp_path)
    table = (tmp_path / 'table.md').read_text().splitlines()
    assert table[2].startswith('| retrained at the widths of learned size λ 0.4 | 2.40 | 8.00 | '
                               '550 |  | 31 |')
    assert table[2].endswith('| yes |') and table[3].endswith('|  |')   # W3A8: dominated
    assert (tmp_path / 'pareto.png').stat().st_size > 10_000
