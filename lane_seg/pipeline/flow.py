"""
The optical-flow pipeline: a stream of frames in, flow between consecutive frames out.

>>> fp = FlowPipeline.from_model()                  # shipped int8 model, backend auto
>>> fp(image0, 'bgra8', 0.00)                       # None: the first frame starts a pair
>>> res = fp(image1, 'bgra8', 0.05)
>>> res.flow                                        # (H, W, 2) float32, camera pixels

The flow is from the previous frame to the current one, at the previous frame's pixels, in
pixels per frame at the camera's resolution (u right, v down), like ``32FC2`` flow topics.
Each frame is pre-processed once and kept for the next pair. The pair restarts (the call
returns None and :attr:`FlowPipeline.last_reset` says why) on the first frame, when the
resolution or encoding changes, when time jumps back, or when the gap between frames exceeds
``max_gap_s``.
"""

from dataclasses import dataclass
import time

import numpy as np

from .frames import FramePreparer
from .lanes import describe
from .postprocess import flow_to_camera
from .preprocess import RoiBox
from ..engines import load_engine

TASK = 'optical_flow'


@dataclass
class FlowResult:
    """One frame pair's result; arrays are new per call."""

    flow: np.ndarray      # (H, W, 2) float32 camera pixels, previous -> current frame
    timings: dict         # milliseconds: preprocess, inference, postprocess
    dt_s: float           # seconds between the two frames
    box: RoiBox           # region the model saw, in frame pixels (NaN flow outside)


def _num(value: float) -> str:
    return f'{round(float(value), 3):g}'


class FlowPipeline:
    """Keeps the previous pre-processed frame; pre-processing, engine, post-processing."""

    def __init__(self, engine, max_gap_s=0.5, model=None, logger=None):
        meta = engine.metadata
        self.model = str(model or getattr(engine, 'source', '') or meta.get('name'))
        if meta.get('task') != TASK:
            raise ValueError(f'{self.model} is a {meta.get("task")} model; the flow pipeline '
                             f'needs an {TASK} model')
        if max_gap_s is not None and not max_gap_s > 0:
            raise ValueError(f'max_gap_s={max_gap_s} must be > 0 (or None: no limit)')
        self.engine = engine
        self.meta = meta
        self.logger = logger
        self.max_gap_s = max_gap_s
        spec_in = meta['inputs'][0]
        out = meta['outputs'][0]
        self.flow_scale = float(out['flow_scale'])
        self._input_name = spec_in['name']
        self._output_name = out['name']
        self._prepare = FramePreparer(meta)
        self._buffer = np.empty(spec_in['shape'], np.float32)   # (1, 6, h, w): prev, current
        self.last_reset = None
        self.resets = 0
        self._pending = 'first frame'
        self._prev = None   # (stamp_s, (H, W), encoding) of the frame in the buffer

    @classmethod
    def from_model(cls, model_path=None, backend='auto', threads=2, max_gap_s=0.5, logger=None,
                   cache_dir=None, device=None):
        """Load ``model_path`` (None: the shipped int8 flow model) on ``backend``."""
        if model_path is None:
            from ..resources import shipped_model
            model_path = shipped_model('flow', 'int8', backend)
        engine = load_engine(model_path, backend=backend, threads=threads, cache_dir=cache_dir,
                             device=device, logger=logger)
        try:
            return cls(engine, max_gap_s=max_gap_s, model=model_path, logger=logger)
        except Exception:
            engine.close()
            raise

    @property
    def input_size(self) -> tuple:
        return tuple(self.meta['inputs'][0]['shape'][2:])

    def reset(self, reason: str = 'first frame'):
        """Forget the previous frame: the next call starts a new pair (returns None)."""
        self._prev = None
        self._pending = reason

    def _reset_reason(self, shape, encoding, stamp_s):
        if self._prev is None:
            return self._pending
        prev_stamp, prev_shape, prev_encoding = self._prev
        if shape != prev_shape:
            return (f'resolution changed {prev_shape[0]}x{prev_shape[1]} -> '
                    f'{shape[0]}x{shape[1]}')
        if encoding != prev_encoding:
            return f'encoding changed {prev_encoding} -> {encoding}'
        if stamp_s < prev_stamp:
            return f'time jumped back {_num(prev_stamp - stamp_s)} s'
        if self.max_gap_s is not None and stamp_s - prev_stamp > self.max_gap_s:
            return f'gap {_num(stamp_s - prev_stamp)} s > max_gap_s {_num(self.max_gap_s)} s'
        return None

    def __call__(self, image: np.ndarray, encoding: str, stamp_s: float):
        """Flow from the previous frame to ``image``; None when this frame starts a pair."""
        t0 = time.perf_counter()
        stamp_s = float(stamp_s)
        shape = tuple(image.shape[:2])
        current = self._buffer[0, 3:]
        _, box = self._prepare(image, encoding, out=current)
        reason = self._reset_reason(shape, encoding, stamp_s)
        prev_stamp = self._prev[0] if self._prev is not None else stamp_s
        self._prev = (stamp_s, shape, encoding)
        if reason is not None:
            self._buffer[0, :3] = current
            self.last_reset = reason
            self.resets += 1
            self._pending = 'first frame'
            return None
        self.last_reset = None
        t1 = time.perf_counter()
        try:
            out = self.engine.infer({self._input_name: self._buffer})[self._output_name]
        except Exception:
            self.reset('engine error on the previous frame')
            raise
        t2 = time.perf_counter()
        self._buffer[0, :3] = current   # this frame is the next pair's previous frame
        flow = flow_to_camera(out[0], box, shape, self.input_size, self.flow_scale)
        t3 = time.perf_counter()
        return FlowResult(flow=flow, dt_s=stamp_s - prev_stamp, box=box,
                          timings={'preprocess': (t1 - t0) * 1e3, 'inference': (t2 - t1) * 1e3,
                                   'postprocess': (t3 - t2) * 1e3})

    def describe(self) -> dict:
        """Model, backend, precision and input size (plus 'building' while an engine builds)."""
        return describe(self, {'max_gap_s': self.max_gap_s, 'flow_scale': self.flow_scale})

    def close(self):
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
