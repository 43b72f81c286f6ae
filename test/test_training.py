"""
A few training steps end to end: float, QAT, export to the shipped artefacts, and the CLI.

Everything runs on a 4-frame cache of the synthetic drive with tiny models (a 1-level U-Net of
base width 4, a 3-level FlowNetS at width 1/16), so each run takes a fraction of a second.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

from helpers import FLOW, quiet, TINY, tiny_cache
from lane_seg.cli import main
from lane_seg.evaluate import OpenCVFlow
from lane_seg.metrics import epe
from lane_seg.models import checkpoint
from lane_seg.models.export import check_tensorrt_qdq
from lane_seg.models.metadata import read_model_metadata
from lane_seg.models.quant import act_quantizers, QConv2d
from lane_seg.train import flow, seg
from lane_seg.train.cache import FrameCache
from lane_seg.train.package import export_models
import numpy as np
import onnxruntime as ort
import pytest
import torch

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def runs(tmp_path_factory, one_thread_module):
    root = tmp_path_factory.mktemp('train')
    cache = tiny_cache(root / 'c')
    data = f'cache:{cache}'
    common = {'data': data, 'val': data, 'input_size': (64, 128), 'crop': (32, 64),
              'epochs': 1, 'batch': 2, 'threads': 1, 'calib_batches': 2}
    ns = SimpleNamespace(root=root, cache=cache, data=data)
    ns.seg = seg.train(seg.SegTrainConfig(out=str(root / 'lane_fp32'), arch=dict(TINY),
                                          max_train=4, **common), log=quiet)
    ns.seg_q = seg.train(seg.SegTrainConfig(out=str(root / 'lane_int8'), arch=dict(TINY),
                                            max_train=4, init=ns.seg['checkpoint'],
                                            quant_bits=8, **common), log=quiet)
    ns.seg_files = export_models(ns.seg['checkpoint'], ns.seg_q['checkpoint'],
                                 root / 'models', 'lane')
    ns.flow = flow.train(flow.FlowTrainConfig(out=str(root / 'flow_fp32'), arch=dict(FLOW),
                                              **common), log=quiet)
    ns.flow_q = flow.train(flow.FlowTrainConfig(out=str(root / 'flow_int8'), arch=dict(FLOW),
                                                init=ns.flow['checkpoint'], quant_bits=8,
                                                **common), log=quiet)
    ns.flow_files = export_models(ns.flow['checkpoint'], ns.flow_q['checkpoint'],
                                  root / 'models', 'flow')
    yield ns


def sidecar(path):
    return json.loads(Path(path).with_suffix('.json').read_text())


def test_cache_layout(runs):
    frames = FrameCache(runs.cache)
    assert len(frames) == 4
    assert frames.index['size'] == [96, 128] and frames.index['seeds'] == [1, 2]
    assert frames.images.shape == (4, 96, 128, 3) and frames.flow.shape == (4, 96, 128, 2)
    assert frames.masks.shape == frames.valid.shape == (4, 96, 128)
    assert frames.masks.any()


def test_comma_separated_sources_are_concatenated_in_order(runs, tmp_path):
    other = tiny_cache(tmp_path / 'other')
    one = seg.LaneSamples(runs.data)
    both = seg.LaneSamples(f'{runs.data}, cache:{other}')
    assert len(both) == 2 * len(one) == 8
    first = FrameCache(runs.cache)
    np.testing.assert_array_equal(both[3][0], first.images[3])
    second = FrameCache(other)
    np.testing.assert_array_equal(both[4][0], second.images[0])
    np.testing.assert_array_equal(both[7][1], second.masks[3] > 0)
    pairs = flow.FlowSamples(f'{runs.data},cache:{other}')
    np.testing.assert_array_equal(pairs[5][2], second.flow[1].astype(np.float32))
    with pytest.raises(IndexError, match='out of range'):
        both[8]
    with pytest.raises(ValueError, match="unknown kind 'kitti'"):
        seg.LaneSamples(f'{runs.data},kitti:{other}')


def test_seg_float_training_writes_a_checkpoint(runs):
    result = runs.seg
    assert result['checkpoint'].endswith('lane_fp32.safetensors')
    metrics = result['metrics']
    assert {'iou', 'f1', 'loss', 'frames'} <= set(metrics)
    assert math.isfinite(metrics['loss']) and metrics['loss'] > 0
    assert 0.0 <= metrics['iou'] <= metrics['f1'] <= 1.0
    assert metrics['frames'] == 4
    info = sidecar(result['checkpoint'])
    assert info['metrics']['val'] == metrics
    assert [h['epoch'] for h in info['metrics']['history']] == [1]
    assert info['architecture'] == {'type': 'unet', 'config': TINY, 'quant': None}
    assert info['training']['seed'] == 0 and info['training']['config']['max_train'] == 4
    assert info['quantization'] == {'scheme': 'float32'}
    model, _ = checkpoint.load_model(result['checkpoint'], task='lane_segmentation')
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 128)).shape == (1, 1, 32, 64)


def test_seg_qat_gives_an_8_bit_checkpoint(runs):
    info = sidecar(runs.seg_q['checkpoint'])
    assert info['architecture']['config'] == TINY
    assert info['architecture']['quant']['weight_bits'] == 8
    assert info['architecture']['quant']['act_bits'] == 8
    assert info['quantization']['scheme'] == 'qdq-int8-symmetric'
    # Epoch 0 is the PTQ model right after calibration, epoch 1 after QAT.
    assert [h['epoch'] for h in info['metrics']['history']] == [0, 1]
    assert math.isfinite(runs.seg_q['metrics']['loss'])
    model, _ = checkpoint.load_model(runs.seg_q['checkpoint'])
    assert any(isinstance(m, QConv2d) for m in model.modules())
    assert all(bool(m.calibrated) for m in act_quantizers(model))


def test_seg_export_writes_all_artefacts(runs):
    files = runs.seg_files
    assert set(files) == {'fp32_checkpoint', 'fp32_onnx', 'int8_checkpoint', 'int8_qdq_onnx',
                          'int8_ort_onnx', 'int8_u8u8_onnx'}
    assert check_tensorrt_qdq(files['int8_qdq_onnx']) == []
    assert check_tensorrt_qdq(files['fp32_onnx'])       # not quantized: refused
    assert check_tensorrt_qdq(files['int8_ort_onnx'])   # uint8 activations: refused
    assert check_tensorrt_qdq(files['int8_u8u8_onnx'])  # uint8 weights too: refused
    for key in ('fp32_onnx', 'int8_qdq_onnx', 'int8_ort_onnx', 'int8_u8u8_onnx'):
        meta = read_model_metadata(files[key])
        assert meta['name'] == {'fp32_onnx': 'lane_fp32'}.get(key, 'lane_int8')
        assert meta['inputs'][0]['shape'] == [1, 3, 64, 128]
        sess = ort.InferenceSession(files[key], providers=['CPUExecutionProvider'])
        out = sess.run(None, {'image': np.zeros((1, 3, 64, 128), np.float32)})[0]
        assert out.shape == (1, 1, 32, 64) and np.isfinite(out).all()
    for key in ('fp32_checkpoint', 'int8_checkpoint'):
        info = sidecar(files[key])
        assert 'kind' not in info and info['checkpoint'].endswith('.safetensors')
        checkpoint.load_model(files[key], task='lane_segmentation')


def test_export_refuses_swapped_checkpoints(runs, tmp_path):
    with pytest.raises(ValueError, match='expected a fp32 checkpoint'):
        export_models(runs.seg_q['checkpoint'], runs.seg['checkpoint'], tmp_path, 'x')


def test_flow_training_and_qat(runs):
    for result in (runs.flow, runs.flow_q):
        metrics = result['metrics']
        assert {'epe', 'fl_all', 'loss', 'frames'} <= set(metrics)
        assert math.isfinite(metrics['epe']) and math.isfinite(metrics['loss'])
        assert 0.0 <= metrics['fl_all'] <= 1.0
    info = sidecar(runs.flow_q['checkpoint'])
    assert info['task'] == 'optical_flow'
    assert info['architecture']['config'] == FLOW
    assert info['architecture']['quant']['weight_bits'] == 8
    assert [h['epoch'] for h in info['metrics']['history']] == [0, 1]


def test_flow_export_passes_the_tensorrt_rules(runs):
    files = runs.flow_files
    assert check_tensorrt_qdq(files['int8_qdq_onnx']) == []
    for key in ('fp32_onnx', 'int8_qdq_onnx', 'int8_ort_onnx'):
        meta = read_model_metadata(files[key])
        assert meta['outputs'][0]['flow_scale'] == 20.0
        sess = ort.InferenceSession(files[key], providers=['CPUExecutionProvider'])
        out = sess.run(None, {'frames': np.zeros((1, 6, 64, 128), np.float32)})[0]
        assert out.shape == (1, 2, 16, 32)


def test_flow_predict_full_is_in_frame_pixels(runs):
    model, meta = checkpoint.load_model(runs.flow['checkpoint'])
    frames = FrameCache(runs.cache)
    with torch.no_grad():
        pred = flow.predict_full(model, np.asarray(frames.images[0]),
                                 np.asarray(frames.next[0]), meta)
    assert pred.shape == (96, 128, 2) and np.isfinite(pred).all()


@pytest.mark.parametrize('method', ['dis-medium', 'farneback'])
def test_opencv_flow_runs_on_two_frames(runs, method):
    frames = FrameCache(runs.cache)
    image1, image2 = np.asarray(frames.images[0]), np.asarray(frames.next[0])
    result = OpenCVFlow(method)(image1, image2)
    assert result.shape == (96, 128, 2) and result.dtype == np.float32
    assert np.isfinite(result).all()
    gt = np.asarray(frames.flow[0], np.float32)
    assert math.isfinite(epe(result, gt, np.asarray(frames.valid[0])))


def test_opencv_flow_rejects_unknown_methods():
    with pytest.raises(ValueError, match='not one of'):
        OpenCVFlow('lucas-kanade')


def test_4_bit_study_qat_runs_but_does_not_export(runs, tmp_path):
    result = seg.train(seg.SegTrainConfig(
        data=runs.data, val=runs.data, out=str(tmp_path / 'w4'), arch=dict(TINY),
        input_size=(64, 128), crop=(32, 64), epochs=1, batch=2, threads=1, max_train=2,
        calib_batches=1, init=runs.seg['checkpoint'], quant_bits=4, quant_scheme='study'),
        log=quiet)
    info = sidecar(result['checkpoint'])
    assert info['quantization']['scheme'] == 'fake-quant-w4a4'
    assert info['architecture']['quant']['scheme'] == 'study'
    model, _ = checkpoint.load_model(result['checkpoint'])
    assert all(m.mode == 'sigma4' and m.bits == 4 for m in act_quantizers(model))
    with pytest.raises(ValueError, match='8-bit|signed symmetric'):
        export_models(runs.seg['checkpoint'], result['checkpoint'], tmp_path / 'm', 'w4')


def test_cli_train_seg_smoke(runs, tmp_path, capsys):
    # --epochs 0 at the default 256x512 input: builds, saves, no training.
    out = tmp_path / 'cli_lane'
    rc = main(['train', 'seg', '--data', runs.data, '--val', runs.data, '--out', str(out),
               '--epochs', '0', '--levels', '1', '--base', '4', '--threads', '1'])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result['checkpoint'] == str(out / 'cli_lane.safetensors')
    info = sidecar(result['checkpoint'])
    assert info['inputs'][0]['shape'] == [1, 3, 256, 512]
    assert info['architecture']['config'] == TINY
    assert info['training']['command'].startswith('lane-seg train seg')


def test_cli_ptq_with_zero_epochs(runs, tmp_path, capsys):
    out = tmp_path / 'cli_ptq'
    rc = main(['train', 'seg', '--data', runs.data, '--val', runs.data, '--out', str(out),
               '--epochs', '0', '--init', runs.seg['checkpoint'], '--quant-bits', '8',
               '--max-val', '1', '--threads', '1'])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.split('\n', 1)[1])
    assert {'iou', 'f1'} <= set(result['metrics'])
    assert sidecar(result['checkpoint'])['architecture']['quant']['weight_bits'] == 8


def test_cli_low_bit_options_survive_the_checkpoint(runs, tmp_path, capsys):
    # W4A4 with unsigned grids, least-error ranges and an 8-bit first layer: the options are
    # recorded, a reload rebuilds the same widths, and int8 QDQ export refuses the unsigned form.
    out = tmp_path / 'cli_w4f8'
    rc = main(['train', 'seg', '--data', runs.data, '--val', runs.data, '--out', str(out),
               '--epochs', '0', '--init', runs.seg['checkpoint'], '--quant-bits', '4',
               '--unsigned-relu', '--weight-clip', 'mse', '--act-clip', 'mse',
               '--first-layer-bits', '8', '--max-val', '1', '--threads', '1'])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.split('\n', 1)[1])
    quant = sidecar(result['checkpoint'])['architecture']['quant']
    assert quant['first_layer_bits'] == 8 and quant['weight_bits'] == 4
    model, _ = checkpoint.load_model(result['checkpoint'])
    assert model.q_in.bits == 8
    conv_bits = [m.bits for m in model.modules() if isinstance(m, QConv2d)]
    assert conv_bits[0] == 8 and set(conv_bits[1:]) == {4}
    assert {m.bits for m in act_quantizers(model) if m is not model.q_in} == {4}
    with pytest.raises(ValueError, match='signed symmetric'):
        export_models(runs.seg['checkpoint'], result['checkpoint'], tmp_path / 'm', 'w4f8')


def test_cli_train_flow_and_export(runs, tmp_path, capsys):
    rc = main(['train', 'flow', '--data', runs.data, '--val', runs.data,
               '--out', str(tmp_path / 'cli_flow'), '--epochs', '0', '--width', '0.0625',
               '--levels', '3', '--threads', '1'])
    assert rc == 0
    capsys.readouterr()
    rc = main(['export', 'flow', '--float', runs.flow['checkpoint'],
               '--int8', runs.flow_q['checkpoint'], '--out', str(tmp_path / 'm'),
               '--name', 'f'])
    assert rc == 0
    files = json.loads(capsys.readouterr().out)
    assert check_tensorrt_qdq(files['int8_qdq_onnx']) == []


def test_cli_reports_bad_data_specs(tmp_path, capsys):
    rc = main(['train', 'seg', '--data', str(tmp_path), '--out', str(tmp_path / 'x'),
               '--epochs', '0'])
    assert rc == 2
    assert 'must be KIND:PATH' in capsys.readouterr().err


@pytest.mark.parametrize('task', ['seg', 'flow'])
def test_fine_tuning_a_quantized_checkpoint_keeps_its_quantization_metadata(runs, tmp_path,
                                                                            task):
    module = seg if task == 'seg' else flow
    make = seg.SegTrainConfig if task == 'seg' else flow.FlowTrainConfig
    init = (runs.seg_q if task == 'seg' else runs.flow_q)['checkpoint']
    result = module.train(make(data=runs.data, val=runs.data, out=str(tmp_path / 'ft'),
                               input_size=(64, 128), crop=(32, 64), epochs=0, threads=1,
                               max_val=1, init=init), log=quiet)
    info = sidecar(result['checkpoint'])
    assert info['architecture']['quant']['weight_bits'] == 8
    assert info['quantization']['scheme'] == 'qdq-int8-symmetric'


def test_fine_tuning_records_the_init_models_output_shape(runs, tmp_path):
    common = {'data': runs.data, 'val': runs.data, 'input_size': (64, 128), 'crop': (32, 64),
              'epochs': 0, 'threads': 1, 'max_val': 1}
    classic = seg.train(seg.SegTrainConfig(
        out=str(tmp_path / 'classic'), arch={'levels': 1, 'base': 4, 'variant': 'classic'},
        **common), log=quiet)
    tuned = seg.train(seg.SegTrainConfig(out=str(tmp_path / 'tuned'),
                                         init=classic['checkpoint'], **common), log=quiet)
    model, info = checkpoint.load_model(tuned['checkpoint'])
    with torch.no_grad():
        shape = list(model(torch.zeros(1, 3, 64, 128)).shape)
    assert info['architecture']['config']['variant'] == 'classic'
    assert info['outputs'][0]['shape'] == shape == [1, 1, 64, 128]
