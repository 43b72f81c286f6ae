"""Engines: load-time checks, metadata refusal, backend parity, auto and background builds."""

import json
import logging
import threading
import time

from engine_models import fixture_frames, flow_inputs, session_models, strip_metadata
from lane_seg.engines import BACKENDS, EngineError, load_engine
from lane_seg.engines.auto import choose_backend, load_auto, SwitchingEngine
from lane_seg.engines.base import precision_of, TensorSpec
from lane_seg.engines.int8_kernels import cpu_flags, int8_kernels, u8s8_exact
from lane_seg.engines.onnxruntime_backend import exact_int8_form, OnnxRuntimeEngine
from lane_seg.models.metadata import METADATA_KEY, REQUIRED
from lane_seg.pipeline.frames import FramePreparer
from lane_seg.pipeline.lanes import LanePipeline
import numpy as np
import pytest


@pytest.fixture(scope='session')
def models(tmp_path_factory):
    return session_models(tmp_path_factory)


def _lane_inputs(meta):
    prep = FramePreparer(meta)
    return [prep(f.image, 'bgr8')[0][None] for f in fixture_frames()]


def _rewrite_metadata(src, dst, change):
    """Copy an ONNX model with its embedded metadata changed by ``change(meta)``."""
    import onnx
    model = onnx.load(str(src))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    change(meta)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(meta)
    onnx.save(model, str(dst))
    return dst


def test_onnxruntime_configures_itself_from_metadata(models):
    for stem, shape, precision in (('lane_fp32', (1, 3, 64, 128), 'fp32'),
                                   ('lane_int8_ort', (1, 3, 64, 128), 'int8'),
                                   ('other_int8_qdq', (1, 3, 48, 96), 'int8'),
                                   ('flow_int8_ort', (1, 6, 64, 128), 'int8')):
        with load_engine(models[stem], backend='onnxruntime', threads=1) as engine:
            spec = engine.input_spec()
            assert isinstance(spec, TensorSpec) and spec.shape == shape and spec.static
            assert engine.backend == 'onnxruntime' and engine.precision == precision
            assert engine.describe()['threads'] == 1
            x = np.zeros(shape, np.float32)
            out = engine.infer({spec.name: x})
            assert list(out) == [engine.output_spec().name]
            assert out[engine.output_spec().name].shape == engine.output_spec().shape


def test_stripped_model_is_refused_with_the_missing_keys(models, tmp_path):
    stripped = strip_metadata(models['lane_fp32'], tmp_path / 'stripped.onnx')
    for backend in ('onnxruntime', 'auto', 'torch'):
        with pytest.raises(EngineError) as err:
            load_engine(stripped, backend=backend)
        text = str(err.value)
        assert 'refused' in text, text
        for key in REQUIRED:
            assert key in text, (backend, key, text)


def test_inconsistent_metadata_is_refused_listing_every_problem(models, tmp_path):
    def break_it(meta):
        meta['threshold'] = 1.5
        meta['color_order'] = 'GBR'
        del meta['training']
    bad = _rewrite_metadata(models['lane_fp32'], tmp_path / 'bad.onnx', break_it)
    with pytest.raises(EngineError) as err:
        load_engine(bad, backend='onnxruntime')
    problems = ' | '.join(err.value.problems)
    assert 'threshold' in problems and 'GBR' in problems and "'training'" in problems


def test_metadata_that_contradicts_the_graph_is_refused(models, tmp_path):
    def rename(meta):
        meta['inputs'][0]['name'] = 'img'
        meta['outputs'][0]['shape'] = [1, 1, 64, 128]
    bad = _rewrite_metadata(models['lane_fp32'], tmp_path / 'renamed.onnx', rename)
    with pytest.raises(EngineError) as err:
        load_engine(bad, backend='onnxruntime')
    assert "'img' is not in the graph" in str(err.value)
    assert 'metadata shape [1, 1, 64, 128]' in str(err.value)


def test_load_errors_name_what_is_missing(models, tmp_path):
    with pytest.raises(EngineError, match='does not exist'):
        load_engine(tmp_path / 'nope.onnx')
    with pytest.raises(EngineError, match='not one of'):
        load_engine(models['lane_fp32'], backend='openvino')
    with pytest.raises(EngineError, match='onnxruntime-gpu'):
        load_engine(models['lane_fp32'], backend='onnxruntime', device='cuda')
    with pytest.raises(EngineError, match='checkpoint'):
        load_engine(models['const_flow'], backend='torch', threads=1)
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match='no CUDA GPU'):
            load_engine(models['lane'], backend='torch', device='cuda')
    assert set(BACKENDS) == {'auto', 'onnxruntime', 'tensorrt', 'torch'}


def test_torch_backend_runs_checkpoints_and_onnx_siblings(models):
    with load_engine(models['lane'], backend='torch', threads=1) as engine:
        assert engine.precision == 'fp32' and engine.backend == 'torch'
    with load_engine(models['lane_int8_ort'], backend='torch', threads=1) as engine:
        assert engine.precision == 'int8'
        assert engine.source.endswith('lane_q.safetensors')
        assert engine.input_spec().shape == (1, 3, 64, 128)


def test_checkpoints_pick_torch_under_auto_and_are_refused_elsewhere(models):
    assert str(models['lane']).endswith('.safetensors')
    with load_engine(models['lane'], backend='auto', threads=1) as engine:
        assert engine.backend == 'torch' and engine.precision == 'fp32'
    with pytest.raises(EngineError, match='training checkpoint runs on the torch backend'):
        load_engine(models['lane'], backend='onnxruntime')


@pytest.mark.parametrize('family', ['lane', 'other'])
def test_float_backends_agree(models, family):
    ort = load_engine(models[f'{family}_fp32'], backend='onnxruntime')
    pt = load_engine(models[f'{family}_fp32'], backend='torch', threads=1)
    for x in _lane_inputs(ort.metadata):
        a = ort.infer({'image': x})['logits']
        b = pt.infer({'image': x})['logits']
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def _within_one_step(a, ref):
    """Fraction of values within one int8 step (the reference's max |value| / 127)."""
    step = np.abs(ref).max() / 127.0
    return float(np.mean(np.abs(a - ref) <= step + 1e-6))


@pytest.mark.parametrize('family', ['lane', 'other', 'flow'])
def test_int8_backends_agree_within_one_quantization_step(models, family):
    """ORT (QDQ and uint8 forms) against torch fake-quant, on calibration-range inputs."""
    ref_engine = load_engine(models[f'{family}_int8_qdq'], backend='torch', threads=1)
    meta = ref_engine.metadata
    inputs = flow_inputs(meta)[:, None] if family == 'flow' else _lane_inputs(meta)
    name = meta['inputs'][0]['name']
    out = meta['outputs'][0]['name']
    refs = np.stack([ref_engine.infer({name: x})[out] for x in inputs])
    step = np.abs(refs).max() / 127.0
    # int8_ort runs as given with VNNI and as its u8u8 sibling without (u8s8 kernels saturate
    # there: on an AMD EPYC without VNNI the u8s8 form was up to 18-78 steps off, 11-79 % of
    # values within one step); int8_u8u8 runs as given only where u8u8 is chosen
    for form in ('int8_qdq', 'int8_ort', 'int8_u8u8'):
        engine = load_engine(models[f'{family}_{form}'], backend='onnxruntime')
        got = np.stack([engine.infer({name: x})[out] for x in inputs])
        # Integer kernels and float fake-quant round a few intermediate values differently
        # (ties after re-quantization); those flips move some outputs by a step or a few.
        assert _within_one_step(got, refs) >= 0.95, (form, _within_one_step(got, refs))
        assert np.abs(got - refs).max() <= 5 * step, (form, np.abs(got - refs).max() / step)
        engine.close()


def test_precision_of_schemes():
    assert precision_of({'quantization': {'scheme': 'float32'}}) == 'fp32'
    assert precision_of({'quantization': {'scheme': 'qdq-int8-symmetric'}}) == 'int8'
    assert precision_of({'quantization': {'scheme': 'float16'}}) == 'fp16'


def test_auto_uses_onnxruntime_without_tensorrt_and_says_why(models, caplog):
    choice, why = choose_backend(usable=lambda: (False, 'tensorrt not installed'))
    assert choice == 'onnxruntime' and 'tensorrt not installed' in why
    assert choose_backend(device='cpu')[0] == 'onnxruntime'
    with caplog.at_level(logging.INFO, logger='lane_seg.engines'):
        engine = load_engine(models['lane_int8_ort'], backend='auto')
    assert isinstance(engine, OnnxRuntimeEngine)
    assert any('backend auto: onnxruntime' in r.getMessage() for r in caplog.records)
    engine.close()


class _FakeTrtEngine:
    """Stands in for a TensorRT engine (TensorRT cannot be installed here): wraps ORT."""

    backend = 'tensorrt'
    precision = 'int8'

    def __init__(self, path):
        self._inner = OnnxRuntimeEngine(path, threads=1)
        self.metadata = self._inner.metadata
        self.calls = 0
        self.closed = False

    def input_spec(self):
        return self._inner.input_spec()

    def output_spec(self):
        return self._inner.output_spec()

    def infer(self, inputs):
        self.calls += 1
        return self._inner.infer(inputs)

    def close(self):
        self.closed = True


class _Log:

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(('info', text))

    def warning(self, text):
        self.lines.append(('warning', text))

    def error(self, text):
        self.lines.append(('error', text))

    def debug(self, text):
        pass


def test_background_build_serves_frames_before_during_and_after_the_switch(models):
    """A fake slow builder: frames flow on ONNX Runtime, then on the new engine, none lost."""
    release = threading.Event()
    started = threading.Event()
    built = {}

    def slow_build():
        started.set()
        assert release.wait(30)
        built['engine'] = _FakeTrtEngine(models['lane_int8_qdq'])
        return built['engine']

    log = _Log()
    fallback = OnnxRuntimeEngine(models['lane_int8_ort'], threads=1)
    engine = SwitchingEngine(fallback, slow_build, logger=log)
    pipe = LanePipeline(engine, model=models['lane_int8_ort'])
    frame = fixture_frames()[0].image
    assert started.wait(10)
    served, backends = 0, []
    for _ in range(3):                      # before: the build is under way
        assert pipe(frame, 'bgr8').mask.shape == frame.shape[:2]
        served += 1
        backends.append(pipe.describe()['backend'])
    info = pipe.describe()
    assert info['engine_state'] == 'building engine'
    assert 'serving on onnxruntime' in info['building']
    status = engine.status()
    assert status['state'] == 'building engine' and status['elapsed_s'] >= 0
    assert 'building engine' in status['message']

    stop = threading.Event()
    errors = []

    def frames_during_switch():
        nonlocal served
        while not stop.is_set():
            try:
                assert pipe(frame, 'bgr8').mask is not None
                served += 1
                backends.append(pipe.describe()['backend'])
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)
                return
    worker = threading.Thread(target=frames_during_switch)
    worker.start()
    time.sleep(0.05)
    release.set()                           # during: the switch happens under load
    assert engine.wait(30)
    time.sleep(0.05)
    stop.set()
    worker.join(30)
    for _ in range(3):                      # after
        assert pipe(frame, 'bgr8').mask is not None
        served += 1
        backends.append(pipe.describe()['backend'])
    assert not errors, errors
    assert served == engine.calls            # every frame was served by one engine or the other
    assert backends[0] == 'onnxruntime' and backends[-1] == 'tensorrt'
    switch = backends.index('tensorrt')
    assert set(backends[:switch]) == {'onnxruntime'} and set(backends[switch:]) == {'tensorrt'}
    assert engine.status()['state'] == 'ready' and 'building' not in pipe.describe()
    assert fallback.closed and built['engine'].calls == served - engine.switched_at_call
    switched = [text for level, text in log.lines if 'switched from onnxruntime' in text]
    assert len(switched) == 1 and 'engine built in' in switched[0]
    pipe.close()
    assert built['engine'].closed


def test_failed_background_build_keeps_serving_on_the_cpu(models):
    log = _Log()

    def broken():
        raise EngineError('TensorRT cannot parse the ONNX model: unsupported op')
    engine = SwitchingEngine(OnnxRuntimeEngine(models['lane_int8_ort'], threads=1), broken,
                             logger=log)
    assert engine.wait(10)
    x = np.zeros((1, 3, 64, 128), np.float32)
    assert engine.infer({'image': x})['logits'].shape == (1, 1, 32, 64)
    status = engine.status()
    assert status['state'] == 'build failed' and 'unsupported op' in status['error']
    assert status['backend'] == 'onnxruntime'
    assert [level for level, text in log.lines if 'build failed' in text] == ['error']
    engine.close()


def test_auto_with_tensorrt_usable_builds_in_the_background(models):
    """load_auto wiring: QDQ sibling for TensorRT, ORT form meanwhile, cached engine at once."""
    seen = []
    release = threading.Event()

    def fake_trt(path, build):
        seen.append((path.name, build))
        if not build:
            return None                      # nothing cached
        release.wait(30)
        return _FakeTrtEngine(path)
    log = _Log()
    engine = load_auto(models['lane_int8_ort'], usable=lambda: (True, 'TensorRT 10 on a GPU'),
                       trt_engine=fake_trt, logger=log)
    assert isinstance(engine, SwitchingEngine) and engine.backend == 'onnxruntime'
    # the ORT form this CPU computes exactly with (u8u8 on x86 without VNNI)
    form = 'ort' if int8_kernels()[0] == 'u8s8' else 'u8u8'
    assert engine.engine.source.endswith(f'lane_int8_{form}.onnx')
    assert any('builds in the background' in text for _, text in log.lines)
    release.set()
    assert engine.wait(30) and engine.backend == 'tensorrt'
    assert seen == [('lane_int8_qdq.onnx', False), ('lane_int8_qdq.onnx', True)]
    engine.close()

    cached = load_auto(models['lane_int8_qdq'], usable=lambda: (True, 'TensorRT'),
                       trt_engine=lambda path, build: _FakeTrtEngine(path), logger=log)
    assert isinstance(cached, _FakeTrtEngine)


def test_shipped_models_resolve_per_backend_and_missing_ones_say_where(
        models, tmp_path, monkeypatch):
    import shutil
    from lane_seg import resources
    share = tmp_path / 'share'
    (share / 'models').mkdir(parents=True)
    monkeypatch.setattr(resources, 'share_dirs', lambda: [share])
    with pytest.raises(resources.ResourceError) as err:
        resources.shipped_model('lanes', 'int8')
    assert 'lane_unet_int8_ort.onnx' in str(err.value) and str(share / 'models') in str(err.value)
    for form in ('fp32', 'int8_qdq', 'int8_ort'):
        shutil.copy(models[f'lane_{form}'], share / 'models' / f'lane_unet_{form}.onnx')
    assert resources.shipped_model('lanes', 'int8').name == 'lane_unet_int8_ort.onnx'
    assert resources.shipped_model('lanes', 'int8', 'tensorrt').name == 'lane_unet_int8_qdq.onnx'
    assert resources.shipped_model('lane_segmentation', 'fp32').name == 'lane_unet_fp32.onnx'
    assert resources.model_filename('flow', 'int8') == 'flow_int8_ort.onnx'
    assert resources.model_filename('lanes', 'mixed') == 'lane_unet_mixed_int8_ort.onnx'
    assert resources.model_filename('flow', 'mixed') == 'flow_mixed_int8_ort.onnx'
    assert resources.model_filename('lanes', 'mixed', 'tensorrt') == \
        'lane_unet_mixed_int8_qdq.onnx'
    with pytest.raises(resources.ResourceError, match='lane_unet_mixed_int8_ort.onnx'):
        resources.shipped_model('lanes', 'mixed')   # not copied into this share
    with pytest.raises(ValueError, match='precision'):
        resources.model_filename('lanes', 'int4')
    assert resources.sibling_model(share / 'models' / 'lane_unet_int8_ort.onnx', 'int8_qdq') \
        == share / 'models' / 'lane_unet_int8_qdq.onnx'
    assert resources.sibling_model(share / 'models' / 'lane_unet_fp32.onnx', 'int8_x') is None
    with pytest.raises(ValueError, match='task'):
        resources.shipped_model('cars')
    with LanePipeline.from_model(backend='onnxruntime') as pipe:     # None: shipped int8
        assert pipe.describe()['model'].endswith('lane_unet_int8_ort.onnx')


def test_share_dir_of_a_source_checkout():
    from lane_seg import resources
    dirs = resources.share_dirs()
    assert dirs and resources.share_dir() == dirs[0]
    assert any((d / 'package.xml').exists() for d in dirs)


def test_closing_while_the_engine_builds_closes_the_late_engine(models):
    release = threading.Event()
    built = []

    def slow():
        release.wait(30)
        built.append(_FakeTrtEngine(models['lane_int8_qdq']))
        return built[0]
    fallback = OnnxRuntimeEngine(models['lane_int8_ort'], threads=1)
    engine = SwitchingEngine(fallback, slow)
    engine.close()
    assert fallback.closed
    with pytest.raises(RuntimeError, match='closed'):
        engine.infer({'image': np.zeros((1, 3, 64, 128), np.float32)})
    release.set()
    assert engine.wait(30) and built[0].closed and engine.backend == 'onnxruntime'


def test_u8s8_kernels_are_trusted_only_with_vnni_on_x86():
    assert u8s8_exact('x86_64', {'avx2', 'avx512f', 'avx512_vnni'})[0]
    assert u8s8_exact('x86_64', {'avx2', 'avx_vnni'})[0]
    exact, why = u8s8_exact('x86_64', {'avx2', 'fma', 'avx512f', 'avx512bw'})   # Skylake-SP
    assert not exact and 'without VNNI' in why
    assert not u8s8_exact('x86_64', set())[0]
    assert u8s8_exact('aarch64', set())[0]
    # without /proc/cpuinfo (macOS, Windows): NumPy's detected features
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
    flags = cpu_flags('/nonexistent/cpuinfo')
    assert flags is not None and ('avx512_vnni' in flags) == numpy_features['AVX512VNNI']
    assert ('avx2' in flags) == numpy_features['AVX2']
    assert int8_kernels({}, 'x86_64', {'avx2'}) == ('u8u8', 'x86 CPU without VNNI: u8s8 '
                                                    'kernels saturate')
    assert int8_kernels({}, 'x86_64', {'avx512_vnni'})[0] == 'u8s8'
    assert int8_kernels({'LANE_SEG_INT8_KERNELS': 'u8s8'}, 'x86_64', {'avx2'})[0] == 'u8s8'
    with pytest.raises(ValueError, match='LANE_SEG_INT8_KERNELS=.s8s8. is not one of'):
        int8_kernels({'LANE_SEG_INT8_KERNELS': 's8s8'}, 'x86_64', {'avx2'})


@pytest.mark.parametrize('kernels', ['u8s8', 'u8u8'])
def test_onnxruntime_loads_the_int8_form_the_kernels_need(models, monkeypatch, kernels):
    """Either ORT form given, the engine runs the one for this CPU's (here: forced) kernels."""
    monkeypatch.setenv('LANE_SEG_INT8_KERNELS', kernels)
    want = 'lane_int8_ort.onnx' if kernels == 'u8s8' else 'lane_int8_u8u8.onnx'
    for given in ('lane_int8_ort', 'lane_int8_u8u8'):
        with load_engine(models[given], backend='onnxruntime', threads=1) as engine:
            assert engine.source.endswith(want)
            assert engine.describe()['int8_kernels'].startswith(kernels)
        # what the nodes show in their log line and diagnostics
        with LanePipeline.from_model(models[given], backend='onnxruntime', threads=1) as pipe:
            shown = pipe.describe()
            assert shown['model'] == str(models[given])
            assert shown.get('model_file', str(models[given])).endswith(want)
            assert shown['int8_kernels'].startswith(kernels)
    with load_engine(models['lane_int8_qdq'], backend='onnxruntime', threads=1) as engine:
        assert engine.source.endswith('lane_int8_qdq.onnx')       # signed QDQ: as given
        assert 'int8_kernels' not in engine.describe()
    monkeypatch.setenv('LANE_SEG_INT8_KERNELS', 'fast')
    with pytest.raises(EngineError, match='LANE_SEG_INT8_KERNELS'):
        load_engine(models['lane_int8_ort'], backend='onnxruntime', threads=1)


def test_a_twin_made_from_another_model_is_never_swapped_in(models, tmp_path, monkeypatch,
                                                            caplog):
    """The u8u8 twin must be made from this very u8s8 file (its sidecar names the weights)."""
    import shutil
    monkeypatch.setenv('LANE_SEG_INT8_KERNELS', 'u8u8')
    for name in ('lane_int8_ort', 'lane_int8_u8u8'):
        for suffix in ('.onnx', '.json'):
            shutil.copy(models[name].with_suffix(suffix), tmp_path / f'{name}{suffix}')
    given = tmp_path / 'lane_int8_ort.onnx'
    with load_engine(given, backend='onnxruntime', threads=1) as engine:
        assert engine.source.endswith('lane_int8_u8u8.onnx')        # the real twin
    # a retrained u8s8 model copied over the old one: its old twin no longer matches
    side = json.loads((tmp_path / 'lane_int8_ort.json').read_text())
    side['weights_sha256'] = '0' * 64
    (tmp_path / 'lane_int8_ort.json').write_text(json.dumps(side))
    with caplog.at_level('WARNING'):
        with load_engine(given, backend='onnxruntime', threads=1) as engine:
            assert engine.source == str(given)
    assert 'was not made from it' in caplog.text


def test_the_int8_form_is_chosen_for_the_cpu_provider_only(models, monkeypatch):
    monkeypatch.setenv('LANE_SEG_INT8_KERNELS', 'u8u8')
    path = models['lane_int8_ort']
    assert exact_int8_form(path, on_cpu=False) == (path, None)       # GPU providers: as given
    swapped, kernels = exact_int8_form(path, on_cpu=True)
    assert swapped.name == 'lane_int8_u8u8.onnx' and kernels.startswith('u8u8')
