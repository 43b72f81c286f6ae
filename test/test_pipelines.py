"""Pipelines: metadata-driven pre-processing, full-resolution outputs, parity, flow resets."""

import cv2
from engine_models import CONST_FLOW, drive_frames, fixture_frames, session_models
from lane_seg.engines import load_engine
from lane_seg.metrics import iou_from_counts, lane_counts
from lane_seg.pipeline.flow import FlowPipeline
from lane_seg.pipeline.frames import FramePreparer
from lane_seg.pipeline.lanes import LanePipeline
from lane_seg.pipeline.postprocess import logit, mask_from_scores
from lane_seg.pipeline.preprocess import prepare, roi_box
import numpy as np
import pytest

ENCODE = {'bgr8': None, 'rgb8': cv2.COLOR_BGR2RGB, 'bgra8': cv2.COLOR_BGR2BGRA,
          'rgba8': cv2.COLOR_BGR2RGBA, 'mono8': cv2.COLOR_BGR2GRAY}


@pytest.fixture(scope='session')
def models(tmp_path_factory):
    return session_models(tmp_path_factory)


def encode(bgr, encoding):
    code = ENCODE[encoding]
    return bgr if code is None else cv2.cvtColor(bgr, code)


def pooled_iou(masks_a, masks_b):
    counts = np.sum([lane_counts(a, b) for a, b in zip(masks_a, masks_b)], axis=0)
    return iou_from_counts(*counts)


@pytest.mark.parametrize('encoding', sorted(ENCODE))
@pytest.mark.parametrize('order', ['RGB', 'BGR'])
def test_fast_preprocessing_equals_prepare(encoding, order):
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (75, 130, 3), dtype=np.uint8)
    image = encode(bgr, encoding)
    meta = {'inputs': [{'shape': [1, 3, 32, 48]}], 'color_order': order,
            'normalization': {'scale': 1 / 255, 'mean': [0.4, 0.5, 0.6], 'std': [0.2, 0.3, 0.25]},
            'roi': {'top': 0.3, 'bottom': 0.95, 'left': 0.1, 'right': 0.9}}
    want, box_want = prepare(image, meta, encoding)
    got, box = FramePreparer(meta)(image, encoding)
    assert box == box_want and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    out = np.empty((3, 32, 48), np.float32)
    assert FramePreparer(meta)(image, encoding, out=out)[0] is out


def test_unsupported_or_mismatched_frames_are_refused():
    prep = FramePreparer({'inputs': [{'shape': [1, 3, 8, 8]}], 'color_order': 'RGB',
                          'normalization': {'scale': 1, 'mean': [0, 0, 0], 'std': [1, 1, 1]}})
    with pytest.raises(ValueError, match='supported'):
        prep(np.zeros((8, 8, 3), np.uint8), 'yuv422')
    with pytest.raises(ValueError, match='bgra8 frame must be uint8'):
        prep(np.zeros((8, 8, 3), np.uint8), 'bgra8')


def test_lane_mask_is_full_resolution_and_zero_outside_the_roi(models):
    pipe = LanePipeline.from_model(models['lane_int8_ort'], backend='onnxruntime')
    info = pipe.describe()
    assert info['backend'] == 'onnxruntime' and info['precision'] == 'int8'
    assert info['input_size'] == '64x128' and info['model'].endswith('lane_int8_ort.onnx')
    frame = fixture_frames()[0].image
    res = pipe(frame, 'bgr8')
    assert res.mask.shape == frame.shape[:2] and res.mask.dtype == np.uint8
    assert set(np.unique(res.mask)) <= {0, 255} and res.mask.any()
    assert res.box == roi_box(96, 192, {'top': 0.25, 'bottom': 1.0, 'left': 0.0, 'right': 1.0})
    assert not res.mask[:res.box.top].any()
    assert res.logits.shape == (32, 64)
    assert set(res.timings) == {'preprocess', 'inference', 'postprocess'}
    assert all(v >= 0 for v in res.timings.values())
    # Thresholding logits at logit(t) is thresholding sigmoid(logits) at t.
    up = cv2.resize(res.logits, (res.box.width, res.box.height), interpolation=cv2.INTER_LINEAR)
    expect = (1 / (1 + np.exp(-up.astype(np.float64))) > 0.5).astype(np.uint8) * 255
    assert np.mean(res.mask[res.box.top:] != expect) < 1e-3
    pipe.close()


def test_every_encoding_gives_the_same_mask(models):
    pipe = LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime')
    bgr = fixture_frames()[1].image
    masks = {enc: pipe(encode(bgr, enc), enc).mask for enc in ('bgr8', 'rgb8', 'bgra8',
                                                               'rgba8')}
    for enc, mask in masks.items():
        assert np.array_equal(mask, masks['bgr8']), enc
    assert pipe(encode(bgr, 'mono8'), 'mono8').mask.shape == bgr.shape[:2]


def test_a_frame_of_another_size_is_resized_per_metadata(models):
    pipe = LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime')
    small = fixture_frames()[2].image                       # 96x192
    big = cv2.resize(small, (384, 192), interpolation=cv2.INTER_NEAREST)
    res_small, res_big = pipe(small, 'bgr8'), pipe(encode(big, 'bgra8'), 'bgra8')
    assert res_big.mask.shape == (192, 384)
    assert res_big.box.top == 2 * res_small.box.top
    back = cv2.resize(res_big.mask, (192, 96), interpolation=cv2.INTER_NEAREST)
    assert iou_from_counts(*lane_counts(back, res_small.mask)) > 0.8


def test_other_model_runs_through_every_backend_without_parameters(models):
    """48x96 input, BGR, [-1, 1] normalization, full-frame ROI, threshold 0.3: no overrides."""
    frames = [f.image for f in fixture_frames()]
    results = {}
    for path, backend in (('other_fp32', 'onnxruntime'), ('other_fp32', 'torch'),
                          ('other_int8_qdq', 'onnxruntime'), ('other_int8_ort', 'onnxruntime'),
                          ('other_int8_ort', 'torch'), ('other_int8_ort', 'auto')):
        with LanePipeline.from_model(models[path], backend=backend, threads=1) as pipe:
            assert pipe.input_size == (48, 96) and pipe.threshold == 0.3
            results[path, backend] = [pipe(encode(f, 'bgra8'), 'bgra8').mask for f in frames]
            assert results[path, backend][0].shape == frames[0].shape[:2]
    assert pooled_iou(results['other_fp32', 'torch'], results['other_fp32', 'onnxruntime']) \
        >= 0.99
    ref = results['other_int8_ort', 'torch']
    for key in (('other_int8_qdq', 'onnxruntime'), ('other_int8_ort', 'onnxruntime'),
                ('other_int8_ort', 'auto')):
        assert pooled_iou(results[key], ref) >= 0.99, key
    # The pipeline applied the model's own colour order and normalization: same as by hand.
    engine = load_engine(models['other_fp32'], backend='onnxruntime')
    x, box = prepare(frames[0], engine.metadata, 'bgr8')
    logits = engine.infer({'image': x[None]})['logits'][0, 0]
    by_hand = mask_from_scores(logits, box, frames[0].shape[:2], logit(0.3))
    assert np.array_equal(by_hand, results['other_fp32', 'onnxruntime'][0])


def test_lane_int8_backends_agree_on_masks(models):
    frames = [f.image for f in fixture_frames()]
    with LanePipeline.from_model(models['lane_int8_qdq'], backend='torch', threads=1) as ref:
        ref = [ref(f, 'bgr8').mask for f in frames]
    for path in ('lane_int8_qdq', 'lane_int8_ort'):
        with LanePipeline.from_model(models[path], backend='onnxruntime') as pipe:
            assert pooled_iou([pipe(f, 'bgr8').mask for f in frames], ref) >= 0.99, path


def test_threshold_roi_and_input_size_overrides(models):
    frame = fixture_frames()[0].image
    base = LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime')
    strict = LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime', threshold=0.9)
    low = LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime',
                                  roi=(0.5, 1.0, 0.0, 1.0))
    m_base, m_strict = base(frame, 'bgr8').mask, strict(frame, 'bgr8').mask
    assert not (m_strict & ~m_base).any() and m_strict.sum() < m_base.sum()
    res = low(frame, 'bgr8')
    assert res.box.top == 48 and not res.mask[:48].any()
    assert LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime',
                                   input_size=(64, 128)).input_size == (64, 128)
    with pytest.raises(ValueError, match='fixed 64x128 input'):
        LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime',
                                input_size=(128, 256))
    with pytest.raises(ValueError, match=r'must be in \(0, 1\)'):
        LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime', threshold=1.0)
    with pytest.raises(ValueError, match='fractions'):
        LanePipeline.from_model(models['lane_fp32'], backend='onnxruntime',
                                roi=(0.8, 0.2, 0.0, 1.0))


def test_pipelines_refuse_the_other_task(models):
    with pytest.raises(ValueError, match='needs a lane_segmentation model'):
        LanePipeline.from_model(models['flow_fp32'], backend='onnxruntime')
    with pytest.raises(ValueError, match='needs an optical_flow model'):
        FlowPipeline.from_model(models['lane_fp32'], backend='onnxruntime')


def test_flow_is_scaled_to_camera_pixels(models):
    """Constant model flow (0.5, -0.25) x flow_scale 4 = (2, -1) px at 64x128 input."""
    fp = FlowPipeline.from_model(models['const_flow'], backend='onnxruntime')
    du, dv = CONST_FLOW[0] * 4.0, CONST_FLOW[1] * 4.0
    for h, w in ((96, 192), (150, 100)):
        image = np.full((h, w, 4), 90, np.uint8)
        fp.reset()
        assert fp(image, 'bgra8', 0.0) is None and fp.last_reset == 'first frame'
        res = fp(image, 'bgra8', 0.05)
        assert fp.last_reset is None and res.flow.shape == (h, w, 2)
        assert res.flow.dtype == np.float32 and res.dt_s == pytest.approx(0.05)
        np.testing.assert_allclose(res.flow[..., 0], du * w / 128, rtol=1e-6)
        np.testing.assert_allclose(res.flow[..., 1], dv * h / 64, rtol=1e-6)


def test_flow_resets_on_each_reason(models):
    fp = FlowPipeline.from_model(models['flow_int8_ort'], backend='onnxruntime', max_gap_s=0.5)
    big = np.zeros((96, 192, 4), np.uint8)
    small = np.zeros((48, 96, 4), np.uint8)
    assert fp.last_reset is None
    steps = [
        (big, 'bgra8', 10.0, 'first frame'),
        (big, 'bgra8', 10.05, None),
        (big, 'bgra8', 8.85, 'time jumped back 1.2 s'),
        (big, 'bgra8', 8.9, None),
        (big, 'bgra8', 9.7, 'gap 0.8 s > max_gap_s 0.5 s'),
        (big, 'bgra8', 9.75, None),
        (small, 'bgra8', 9.8, 'resolution changed 96x192 -> 48x96'),
        (small, 'bgra8', 9.85, None),
        (small[..., :3].copy(), 'rgb8', 9.9, 'encoding changed bgra8 -> rgb8'),
        (small[..., :3].copy(), 'rgb8', 9.95, None),
    ]
    for image, encoding, stamp, reason in steps:
        res = fp(image, encoding, stamp)
        assert fp.last_reset == reason, (stamp, fp.last_reset)
        assert (res is None) == (reason is not None)
        if res is not None:
            assert res.flow.shape == image.shape[:2] + (2,)
    assert fp.resets == 5
    fp.reset()
    assert fp(small[..., :3].copy(), 'rgb8', 10.0) is None and fp.last_reset == 'first frame'


class _Spy:
    """Records what the engine is given (wraps a real engine)."""

    def __init__(self, engine):
        self.engine = engine
        self.metadata = engine.metadata
        self.backend = engine.backend
        self.precision = engine.precision
        self.inputs = []

    def input_spec(self):
        return self.engine.input_spec()

    def infer(self, inputs):
        self.inputs.append({k: v.copy() for k, v in inputs.items()})
        return self.engine.infer(inputs)

    def close(self):
        self.engine.close()


def test_flow_pairs_previous_and_current_frames_preprocessed_once(models):
    spy = _Spy(load_engine(models['flow_int8_ort'], backend='onnxruntime'))
    fp = FlowPipeline(spy)
    calls = []
    prepare_once = fp._prepare

    def counting(image, encoding, out=None):
        calls.append(1)
        return prepare_once(image, encoding, out=out)
    fp._prepare = counting
    frames = [f.image for f in drive_frames((96, 192), count=3, seed=5)]
    for i, image in enumerate(frames):
        fp(image, 'bgr8', 0.05 * i)
    assert len(calls) == 3 and len(spy.inputs) == 2
    want = [prepare(f, spy.metadata, 'bgr8')[0] for f in frames]
    for k, sent in enumerate(spy.inputs):
        x = sent['frames'][0]
        np.testing.assert_array_equal(x[:3], want[k])
        np.testing.assert_array_equal(x[3:], want[k + 1])


def test_flow_backends_agree(models):
    frames = [f.image for f in fixture_frames()]
    flows = {}
    for backend in ('torch', 'onnxruntime'):
        fp = FlowPipeline.from_model(models['flow_int8_qdq'], backend=backend, threads=1)
        flows[backend] = [fp(f, 'bgr8', 0.05 * i) for i, f in enumerate(frames)][1:]
        assert fp.describe()['backend'] == backend
    ref = np.stack([r.flow for r in flows['torch']])
    got = np.stack([r.flow for r in flows['onnxruntime']])
    step = np.abs(ref).max() / 127
    assert np.mean(np.abs(got - ref) <= step) >= 0.95
