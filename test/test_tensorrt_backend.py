"""
TensorRT backend: cache keys, QDQ rules and refusals run here; the GPU tests need TensorRT.

TensorRT cannot be installed in this environment (no NVIDIA GPU): the tests that build and
run engines skip with that reason; everything that can be checked without it is.
"""

import importlib.util
import json

from engine_models import session_models
from lane_seg.engines import EngineError, load_engine
from lane_seg.engines.tensorrt_backend import (build_precision, cache_entry, check_model,
                                               default_cache_dir, engine_cache_key,
                                               tensorrt_usable)
from lane_seg.models.export import check_tensorrt_qdq
from lane_seg.models.metadata import read_model_metadata
import numpy as np
import pytest

HAVE_TRT = importlib.util.find_spec('tensorrt') is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason='tensorrt not installed (no NVIDIA GPU here)')


@pytest.fixture(scope='session')
def models(tmp_path_factory):
    return session_models(tmp_path_factory)


def test_cache_key_changes_with_each_keyed_field():
    base = {'model_sha256': 'a' * 64, 'trt_version': '10.3.0', 'gpu_name': 'NVIDIA Orin',
            'input_shape': (1, 3, 256, 512), 'precision': 'int8'}
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base) and len(key) == 24
    changes = {'model_sha256': 'b' * 64, 'trt_version': '10.4.0',
               'gpu_name': 'NVIDIA GeForce RTX 4090', 'input_shape': (1, 3, 288, 512),
               'precision': 'fp16'}
    keys = {key}
    for field, value in changes.items():
        other = engine_cache_key(**dict(base, **{field: value}))
        assert other != key, field
        keys.add(other)
    assert len(keys) == 1 + len(changes)


def test_cache_entry_names_and_location(tmp_path, monkeypatch):
    engine, meta = cache_entry(tmp_path, 'models/lane_unet_int8_qdq.onnx', 'k' * 24)
    assert engine == tmp_path / f'lane_unet_int8_qdq-{"k" * 24}.engine'
    assert meta == engine.with_suffix('.json')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert default_cache_dir() == tmp_path / 'xdg' / 'lane_seg' / 'engines'


@pytest.mark.parametrize('family', ['lane', 'other', 'flow'])
def test_exported_int8_models_pass_the_tensorrt_qdq_rules(models, family):
    assert check_tensorrt_qdq(models[f'{family}_int8_qdq']) == []
    # The ONNX Runtime form (uint8 activations) is not for TensorRT, and says so.
    problems = check_tensorrt_qdq(models[f'{family}_int8_ort'])
    assert problems and any('uint8' in p for p in problems)


def test_models_tensorrt_cannot_take_are_refused_before_any_gpu_work(models):
    with pytest.raises(EngineError, match='lane_int8_qdq.onnx'):
        check_model(models['lane_int8_ort'], read_model_metadata(models['lane_int8_ort']))
    check_model(models['lane_int8_qdq'], read_model_metadata(models['lane_int8_qdq']))
    assert build_precision(read_model_metadata(models['lane_int8_qdq'])) == 'int8'
    assert build_precision(read_model_metadata(models['lane_fp32'])) == 'fp16'
    assert build_precision(read_model_metadata(models['lane_fp32']), 'fp32') == 'fp32'
    with pytest.raises(EngineError, match='calibration'):
        build_precision(read_model_metadata(models['lane_fp32']), 'int8')


@pytest.mark.skipif(HAVE_TRT, reason='checks the error shown where tensorrt is missing')
def test_missing_tensorrt_is_a_clear_load_time_error(models):
    with pytest.raises(EngineError, match='pip install tensorrt'):
        load_engine(models['lane_int8_qdq'], backend='tensorrt')
    ok, why = tensorrt_usable()
    assert not ok and 'tensorrt not installed' in why


@needs_trt
def test_engine_builds_caches_and_matches_onnxruntime(models, tmp_path):
    ok, why = tensorrt_usable()
    if not ok:
        pytest.skip(why)
    from lane_seg.engines.tensorrt_backend import TensorRTEngine
    engine = TensorRTEngine(models['lane_int8_qdq'], cache_dir=tmp_path)
    entry = engine.engine_path
    side = json.loads(entry.with_suffix('.json').read_text())
    assert side['name'] == 'lane_int8' and side['tensorrt']['precision'] == 'int8'
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 128)).astype(np.float32)
    got = engine.infer({'image': x})['logits']
    ref = load_engine(models['lane_int8_qdq'], backend='onnxruntime').infer({'image': x})
    step = np.abs(ref['logits']).max() / 127
    assert np.mean(np.abs(got - ref['logits']) <= 2 * step) >= 0.95
    engine.close()
    mtime = entry.stat().st_mtime_ns
    again = load_engine(models['lane_int8_ort'], backend='tensorrt', cache_dir=tmp_path)
    assert again.engine_path == entry and entry.stat().st_mtime_ns == mtime   # cache hit
    again.close()


@pytest.mark.skipif(HAVE_TRT, reason='checks the errors shown where tensorrt is missing')
def test_prebuilt_engine_files_need_tensorrt(tmp_path):
    engine = tmp_path / 'lane_unet_int8_qdq-0123.engine'
    engine.write_bytes(b'not really an engine')
    with pytest.raises(EngineError, match='backend onnxruntime runs ONNX models'):
        load_engine(engine, backend='onnxruntime')
    with pytest.raises(EngineError, match='pass the .onnx model'):
        load_engine(engine, backend='auto')
