"""
The one engine interface every backend offers, NumPy in and out (pure: numpy only).

An engine is loaded from a self-describing model; at load time it checks everything it can
(the backend is installed, the device is there, the metadata is complete and matches the
graph) and raises :class:`EngineError` naming what is missing and what to install, so that a
node never fails at its first frame.

>>> engine = load_engine('models/lane_unet_int8_ort.onnx', backend='onnxruntime')
>>> spec = engine.input_spec()            # TensorSpec(name='image', shape=(1, 3, 256, 512))
>>> out = engine.infer({spec.name: x})    # {'logits': (1, 1, 128, 256) float32}
>>> engine.close()
"""

from dataclasses import dataclass
import logging
from typing import Protocol, runtime_checkable

import numpy as np

LOGGER_NAME = 'lane_seg.engines'


class EngineError(RuntimeError):
    """
    An engine that cannot be loaded: says what is missing and what to install.

    ``problems`` lists every metadata problem when the model itself was refused.
    """

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for a dynamic dimension), dtype and layout of one tensor."""

    name: str
    shape: tuple
    dtype: str = 'float32'
    layout: str = 'NCHW'

    @property
    def static(self) -> bool:
        return all(isinstance(v, int) and v > 0 for v in self.shape)


@runtime_checkable
class Engine(Protocol):
    """What pipelines, the benchmark and the nodes use of any backend."""

    metadata: dict     # the model's validated lane_seg metadata
    backend: str       # 'onnxruntime', 'tensorrt', 'torch'
    precision: str     # 'int8', 'fp16', 'fp32'

    def input_spec(self) -> TensorSpec:
        """Describe the model's (single) input as the backend runs it."""

    def output_spec(self) -> TensorSpec:
        """Describe the model's (single) output."""

    def infer(self, inputs: dict) -> dict:
        """Run one batch: ``{input name: float32 array}`` -> ``{output name: array}``."""

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""


def precision_of(meta: dict) -> str:
    """Precision a model's weights and activations run at: 'int8', 'fp16' or 'fp32'."""
    scheme = str(meta.get('quantization', {}).get('scheme', 'float32')).lower()
    if 'int8' in scheme:
        return 'int8'
    if scheme in ('float16', 'fp16'):
        return 'fp16'
    return 'fp32'


def log(logger, level: str, text: str):
    """Log through a ``logging.Logger`` or an rclpy logger (both have info/warning/error)."""
    logger = logger or logging.getLogger(LOGGER_NAME)
    method = getattr(logger, level, None) or getattr(logger, 'info')
    method(text)


class BaseEngine:
    """Shared plumbing: specs from metadata, input checks, context manager."""

    backend = 'base'

    def __init__(self, metadata: dict, precision: str = None, source: str = ''):
        self.metadata = metadata
        self.precision = precision or precision_of(metadata)
        self.source = str(source)
        spec_in = metadata['inputs'][0]
        spec_out = metadata['outputs'][0]
        self._input = TensorSpec(spec_in['name'], tuple(spec_in['shape']),
                                 spec_in.get('dtype', 'float32'), spec_in.get('layout', 'NCHW'))
        self._output = TensorSpec(spec_out['name'], tuple(spec_out['shape']))
        self.closed = False

    def input_spec(self) -> TensorSpec:
        return self._input

    def output_spec(self) -> TensorSpec:
        return self._output

    def _input_array(self, inputs: dict) -> np.ndarray:
        """Return the input array checked against the spec (a clear error, not a crash)."""
        if self.closed:
            raise RuntimeError(f'{self.backend} engine for {self.source} is closed')
        name = self._input.name
        if name not in inputs:
            raise ValueError(f'input {name!r} missing; got {sorted(inputs)}')
        x = inputs[name]
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        shape = self._input.shape
        if x.ndim != len(shape) or any(want is not None and want != got
                                       for want, got in zip(shape, x.shape)):
            raise ValueError(f'input {name!r} has shape {tuple(x.shape)}, the model takes '
                             f'{tuple(shape)}')
        return np.ascontiguousarray(x)

    def describe(self) -> dict:
        return {'backend': self.backend, 'precision': self.precision, 'model': self.source,
                'name': self.metadata.get('name')}

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
