"""``--learn-bits`` end to end: train, widths in the metadata, reload, export."""

import json
from pathlib import Path

from lane_seg.models import checkpoint
from lane_seg.models.export import check_tensorrt_qdq
from lane_seg.models.quant import QConv2d
from lane_seg.train.cache import build_cache
from lane_seg.train.package import export_models
from lane_seg.train.seg import SegTrainConfig, train
import pytest
import torch

ARCH = {'levels': 1, 'base': 4, 'variant': 'fast', 'separable': False}


def _base(tmp) -> dict:
    """Run settings every training run here shares (a tiny U-Net on a 4-frame cache)."""
    return {'data': f'cache:{tmp}/c', 'val': f'cache:{tmp}/c', 'arch': ARCH,
            'input_size': (64, 128), 'crop': (32, 64), 'batch': 2, 'threads': 1, 'max_val': 2}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp('learn_bits')
    build_cache(tmp / 'c', seeds=[1, 2], frames=2, height=96, width=128, progress=False)
    base = _base(tmp)
    fp = train(SegTrainConfig(out=str(tmp / 'f'), epochs=1, **base), log=lambda m: None)
    # lambda 0.05 and a large width learning rate: the hardware term wins within one epoch.
    lb = train(SegTrainConfig(out=str(tmp / 'q'), epochs=1, init=fp['checkpoint'],
                              quant_bits=8, learn_bits='per_layer', bits_lambda=0.05,
                              bits_lr=40.0, bits_hardware='size', **base), log=lambda m: None)
    return tmp, fp, lb


def test_learned_widths_are_written_and_smaller(runs):
    _, _, lb = runs
    meta = json.loads(Path(lb['checkpoint']).with_suffix('.json').read_text())
    widths = meta['quantization']['layer_bits']
    assert set(widths) == {'weights', 'activations'}
    assert all(2 <= b <= 8 for b in widths['weights'].values())
    assert min(widths['weights'].values()) < 8      # the size loss pushed weights down
    model, _ = checkpoint.load_model(lb['checkpoint'])
    weights = {name: m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, QConv2d)}
    assert meta['quantization']['model_size_bits'] == sum(
        n * widths['weights'][name] for name, n in weights.items())
    assert meta['quantization']['model_size_bits'] < 8 * sum(weights.values())
    assert meta['quantization']['learned']['hardware'] == 'size'


def test_reload_restores_the_widths(runs):
    _, _, lb = runs
    model, meta = checkpoint.load_model(lb['checkpoint'])
    widths = meta['quantization']['layer_bits']['weights']
    for name, module in model.named_modules():
        if isinstance(module, QConv2d):
            assert module.bits == widths[name], name


def test_learned_model_exports_to_tensorrt_rules(runs):
    tmp, fp, lb = runs
    paths = export_models(fp['checkpoint'], lb['checkpoint'], tmp / 'models', 'lb')
    assert check_tensorrt_qdq(paths['int8_qdq_onnx']) == []
    assert Path(paths['int8_ort_onnx']).exists()


def test_retrain_at_learned_widths(runs):
    """--layer-bits: QAT from the float model at the widths a learned run found."""
    tmp, fp, lb = runs
    base = _base(tmp)
    rt = train(SegTrainConfig(out=str(tmp / 'r'), epochs=1, init=fp['checkpoint'],
                              quant_bits=8, layer_bits=lb['checkpoint'], **base),
               log=lambda m: None)
    learned = json.loads(Path(lb['checkpoint']).with_suffix('.json').read_text())
    meta = json.loads(Path(rt['checkpoint']).with_suffix('.json').read_text())
    quant = meta['quantization']
    assert quant['scheme'] == 'fixed-layer-bits'
    assert quant['layer_bits'] == learned['quantization']['layer_bits']
    # computed from the trained model's quantizers, not from the file: weight and activation
    # widths were applied
    for key in ('model_size_bits', 'bitops', 'sum_bits'):
        assert quant[key] == learned['quantization'][key], key
    assert quant['bitops'] < 64 * quant['macs']
    paths = export_models(fp['checkpoint'], rt['checkpoint'], tmp / 'rt_models', 'rt')
    assert check_tensorrt_qdq(paths['int8_qdq_onnx']) == []


def test_layer_bits_file_names_some_layers_and_is_checked(runs):
    tmp, fp, lb = runs
    base = _base(tmp)
    model, _ = checkpoint.load_model(lb['checkpoint'])
    first = next(n for n, m in model.named_modules() if isinstance(m, QConv2d))
    widths = tmp / 'one.json'
    widths.write_text(json.dumps({'weights': {first: 3}}))
    rt = train(SegTrainConfig(out=str(tmp / 'one'), epochs=0, init=fp['checkpoint'],
                              quant_bits=6, layer_bits=str(widths), **base), log=lambda m: None)
    weights = json.loads(Path(rt['checkpoint']).with_suffix('.json').read_text())[
        'quantization']['layer_bits']['weights']
    assert weights[first] == 3
    assert {b for n, b in weights.items() if n != first} == {6}   # the rest: --quant-bits
    widths.write_text(json.dumps({'weights': {'no.such.layer': 3}}))
    with pytest.raises(ValueError, match='no.such.layer'):
        train(SegTrainConfig(out=str(tmp / 'bad'), epochs=0, init=fp['checkpoint'],
                             quant_bits=8, layer_bits=str(widths), **base), log=lambda m: None)
    refused = {
        '--layer-bits needs --quant-bits': {'init': fp['checkpoint']},
        'needs a float --init .* is already quantized': {'init': lb['checkpoint'],
                                                         'quant_bits': 8},
        'needs --init: the float model': {'quant_bits': 8},
        'use one of the two': {'init': fp['checkpoint'], 'quant_bits': 8,
                               'learn_bits': 'per_layer'},
    }
    for message, settings in refused.items():
        with pytest.raises(ValueError, match=message):
            train(SegTrainConfig(out=str(tmp / 'refused'), epochs=0, layer_bits=str(widths),
                                 **settings, **base), log=lambda m: None)
