"""
The lane segmentation pipeline: camera frame in, full-resolution lane mask out.

>>> pipe = LanePipeline.from_model()             # the shipped int8 model, backend auto
>>> res = pipe(image, 'bgra8')                   # any size, any supported encoding
>>> res.mask                                     # (H, W) uint8, 255 on lane boundaries
>>> res.timings                                  # {'preprocess', 'inference', 'postprocess'} ms

Everything model-specific (input size, region of interest, colour order, normalization,
output kind, threshold) comes from the model's metadata; the keyword arguments only
override the threshold and the region of interest, or the input size of a model that
accepts other sizes.
"""

from dataclasses import dataclass
from pathlib import Path
import time

import numpy as np

from .frames import FramePreparer
from .postprocess import mask_from_scores, score_threshold
from .preprocess import RoiBox
from ..engines import load_engine
from ..models.metadata import with_updates

TASK = 'lane_segmentation'


@dataclass
class LaneResult:
    """One frame's result; arrays are new per call (safe to keep)."""

    mask: np.ndarray      # (H, W) uint8, 0 / 255, at the frame's resolution
    logits: np.ndarray    # (h, w) float32 model output at the model's resolution
    timings: dict         # milliseconds: preprocess, inference, postprocess
    box: RoiBox           # region of interest in frame pixels


def check_roi(roi) -> dict:
    """ROI as a dict of fractions (also from a (top, bottom, left, right) sequence)."""
    if not isinstance(roi, dict):
        values = tuple(float(v) for v in roi)
        if len(values) != 4:
            raise ValueError(f'roi {roi!r} must be (top, bottom, left, right) fractions')
        roi = dict(zip(('top', 'bottom', 'left', 'right'), values))
    try:
        roi = {k: float(roi[k]) for k in ('top', 'bottom', 'left', 'right')}
    except KeyError as exc:
        raise ValueError(f'roi {roi!r} needs top, bottom, left and right') from exc
    if not (0.0 <= roi['top'] < roi['bottom'] <= 1.0 and 0.0 <= roi['left'] < roi['right'] <= 1.0):
        raise ValueError(f'roi {roi} must be fractions with 0 <= top < bottom <= 1 and '
                         '0 <= left < right <= 1')
    return roi


def resize_metadata(meta: dict, engine, input_size, source='model') -> dict:
    """Metadata for another input size, if the engine's graph accepts it (else ValueError)."""
    h, w = (int(v) for v in input_size)
    h0, w0 = meta['inputs'][0]['shape'][2:]
    if (h, w) == (h0, w0):
        return meta
    dims = tuple(engine.input_spec().shape)[2:]
    if any(d is not None for d in dims):
        raise ValueError(f'{source}: input_size {h}x{w} refused: the model takes a fixed '
                         f'{h0}x{w0} input (static ONNX graph); leave input_size unset (the '
                         'frame is resized to the model) or export the model with dynamic '
                         'height and width')
    spec_in = dict(meta['inputs'][0], shape=[1, meta['inputs'][0]['shape'][1], h, w])
    out = meta['outputs'][0]
    oh, ow = out['shape'][2:]
    spec_out = dict(out, shape=[1, out['shape'][1], h * oh // h0, w * ow // w0])
    return with_updates(meta, inputs=[spec_in], outputs=[spec_out])


class LanePipeline:
    """Pre-processing, an engine, post-processing; per-stage timings."""

    def __init__(self, engine, threshold=None, roi=None, input_size=None, model=None,
                 logger=None):
        meta = engine.metadata
        self.model = str(model or getattr(engine, 'source', '') or meta.get('name'))
        if meta.get('task') != TASK:
            raise ValueError(f'{self.model} is an {meta.get("task")} model; the lane pipeline '
                             f'needs a {TASK} model')
        if roi is not None:
            meta = with_updates(meta, roi=check_roi(roi))
        if input_size is not None:
            meta = resize_metadata(meta, engine, input_size, self.model)
        self.engine = engine
        self.meta = meta
        self.logger = logger
        self.threshold = float(threshold if threshold is not None else meta.get('threshold', 0.5))
        out = meta['outputs'][0]
        self._score_threshold = score_threshold(self.threshold, out['kind'])
        self._input_name = meta['inputs'][0]['name']
        self._output_name = out['name']
        self._prepare = FramePreparer(meta)
        self._buffer = np.empty(meta['inputs'][0]['shape'], np.float32)

    @classmethod
    def from_model(cls, model_path=None, backend='auto', threads=2, threshold=None, roi=None,
                   input_size=None, logger=None, cache_dir=None, device=None):
        """Load ``model_path`` (None: the shipped int8 model) on ``backend``."""
        if model_path is None:
            from ..resources import shipped_model
            model_path = shipped_model('lanes', 'int8', backend)
        engine = load_engine(model_path, backend=backend, threads=threads, cache_dir=cache_dir,
                             device=device, logger=logger)
        try:
            return cls(engine, threshold=threshold, roi=roi, input_size=input_size,
                       model=model_path, logger=logger)
        except Exception:
            engine.close()
            raise

    @property
    def input_size(self) -> tuple:
        return tuple(self.meta['inputs'][0]['shape'][2:])

    def __call__(self, image: np.ndarray, encoding: str = 'bgr8') -> LaneResult:
        t0 = time.perf_counter()
        _, box = self._prepare(image, encoding, out=self._buffer[0])
        t1 = time.perf_counter()
        scores = self.engine.infer({self._input_name: self._buffer})[self._output_name]
        t2 = time.perf_counter()
        scores = scores[0, 0]
        mask = mask_from_scores(scores, box, image.shape[:2], self._score_threshold)
        t3 = time.perf_counter()
        return LaneResult(mask=mask, logits=scores, box=box,
                          timings={'preprocess': (t1 - t0) * 1e3, 'inference': (t2 - t1) * 1e3,
                                   'postprocess': (t3 - t2) * 1e3})

    def describe(self) -> dict:
        """Model, backend, precision and input size (plus 'building' while an engine builds)."""
        return describe(self, {'threshold': self.threshold, 'roi': self.meta.get('roi')})

    def close(self):
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def describe(pipe, extra: dict) -> dict:
    """Describe what a pipeline runs, for the start-up log line and diagnostics."""
    engine = pipe.engine
    h, w = pipe.input_size
    info = {'model': pipe.model, 'backend': engine.backend, 'precision': engine.precision,
            'input_size': f'{h}x{w}', 'name': pipe.meta.get('name'), 'task': pipe.meta['task']}
    source = getattr(engine, 'source', None)   # the file run, where the engine chose a twin
    if source and Path(str(source)).name != Path(str(pipe.model)).name:
        info['model_file'] = str(source)
    kernels = getattr(engine, 'int8_kernels', None)
    if kernels:
        info['int8_kernels'] = kernels
    info.update(extra)
    status = getattr(engine, 'status', None)
    if status is not None:
        state = status()
        info['engine_state'] = state['state']
        if state['state'] == 'building engine':
            info['building'] = (f'{state["target"]}, {state["elapsed_s"]:.0f} s elapsed, '
                                f'serving on {state["backend"]}')
        elif state.get('error'):
            info['engine_error'] = state['error']
    return info
