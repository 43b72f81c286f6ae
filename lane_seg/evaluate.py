"""
Accuracy and latency of a model or an OpenCV flow method on a data set (``lane-seg eval``).

Prints one JSON object; runs through the same pipelines the nodes use.
"""

import time

import cv2
import numpy as np

from .data import open_flow_dataset, open_lane_dataset
from .metrics import epe as epe_metric, fl_all as fl_all_metric, flow_valid_count, lane_counts

OPENCV_METHODS = ('dis-ultrafast', 'dis-fast', 'dis-medium', 'farneback')


def _latency(ms):
    ms = np.asarray(ms, dtype=np.float64)
    if ms.size == 0:
        return {'p50': None, 'p95': None, 'mean': None}
    return {'p50': round(float(np.percentile(ms, 50)), 3),
            'p95': round(float(np.percentile(ms, 95)), 3),
            'mean': round(float(ms.mean()), 3)}


def _model_path(model, task):
    from .resources import PRECISIONS, shipped_model
    if model is None or model in PRECISIONS:
        return str(shipped_model('lanes' if task == 'seg' else 'flow', model or 'int8'))
    return model


def eval_seg(data, fmt='folder', model=None, backend='auto', threads=2, limit=0,
             **dataset_kwargs) -> dict:
    """Pooled lane-pixel IoU and F1 at the label's resolution, and per-frame latency."""
    from .pipeline.lanes import LanePipeline
    dataset = open_lane_dataset(data, fmt=fmt, **dataset_kwargs)
    path = _model_path(model, 'seg')
    pipe = LanePipeline.from_model(path, backend=backend, threads=threads)
    tp = fp = fn = 0
    latencies = []
    n = len(dataset) if not limit else min(limit, len(dataset))
    try:
        for i in range(n):
            item = dataset[i]
            gt = item['mask'] > 0
            t0 = time.perf_counter()
            res = pipe(item['image'], 'bgr8')
            latencies.append((time.perf_counter() - t0) * 1e3)
            pred = res.mask > 0
            if pred.shape != gt.shape:
                pred = cv2.resize(res.mask, (gt.shape[1], gt.shape[0]),
                                  interpolation=cv2.INTER_NEAREST) > 0
            a, b, c = lane_counts(pred, gt)
            tp, fp, fn = tp + a, fp + b, fn + c
        described = pipe.describe()
    finally:
        pipe.close()
    return {'task': 'lane_segmentation', 'iou': round(tp / max(tp + fp + fn, 1), 4),
            'f1': round(2 * tp / max(2 * tp + fp + fn, 1), 4), 'frames': n,
            'model_path': str(path), 'backend': described.get('backend'),
            'precision': described.get('precision'), 'latency_ms': _latency(latencies),
            'data': str(data), 'format': fmt}


class OpenCVFlow:
    """The classical baselines, run on grayscale frames at the data's resolution."""

    def __init__(self, method):
        if method not in OPENCV_METHODS:
            raise ValueError(f'method {method!r} not one of {OPENCV_METHODS}')
        self.method = method
        if method.startswith('dis-'):
            preset = {'dis-ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                      'dis-fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
                      'dis-medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[method]
            self.dis = cv2.DISOpticalFlow_create(preset)

    def __call__(self, image1, image2):
        g1 = cv2.cvtColor(image1, cv2.COLOR_BGR2GRAY)
        g2 = cv2.cvtColor(image2, cv2.COLOR_BGR2GRAY)
        if self.method == 'farneback':
            return cv2.calcOpticalFlowFarneback(g1, g2, None, 0.5, 4, 15, 3, 5, 1.2, 0)
        return self.dis.calc(g1, g2, None)


def eval_flow(data, fmt='folder', model=None, method=None, backend='auto', threads=2,
              limit=0) -> dict:
    """Mean end-point error over valid pixels, KITTI Fl-all, and per-pair latency."""
    dataset = open_flow_dataset(data, fmt=fmt)
    n = len(dataset) if not limit else min(limit, len(dataset))
    if method:
        runner = OpenCVFlow(method)
        describe = {'backend': 'opencv', 'precision': 'float32'}
        close = lambda: None  # noqa: E731
        path = None
    else:
        from .pipeline.flow import FlowPipeline
        path = _model_path(model, 'flow')
        pipe = FlowPipeline.from_model(path, backend=backend, threads=threads)
        describe = pipe.describe()
        close = pipe.close

        def runner(image1, image2):
            pipe.reset()
            pipe(image1, 'bgr8', 0.0)
            return pipe(image2, 'bgr8', 0.05).flow
    sum_epe = 0.0
    sum_out = 0.0
    count = 0
    latencies = []
    try:
        for i in range(n):
            item = dataset[i]
            t0 = time.perf_counter()
            flow = runner(item['image1'], item['image2'])
            latencies.append((time.perf_counter() - t0) * 1e3)
            valid = item['valid']
            k = flow_valid_count(item['flow'], valid)
            if k == 0:
                continue
            sum_epe += epe_metric(flow, item['flow'], valid) * k
            sum_out += fl_all_metric(flow, item['flow'], valid) * k
            count += k
    finally:
        close()
    return {'task': 'optical_flow', 'epe': round(sum_epe / max(count, 1), 4),
            'fl_all': round(sum_out / max(count, 1), 4), 'frames': n,
            'model_path': str(path) if path else None, 'method': method or 'model',
            'backend': describe.get('backend'), 'precision': describe.get('precision'),
            'latency_ms': _latency(latencies), 'data': str(data), 'format': fmt}
