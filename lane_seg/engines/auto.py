"""
``backend: auto``: TensorRT where it is usable, else ONNX Runtime; never a silent start-up.

TensorRT is usable when ``tensorrt`` and cuda-python import and a CUDA GPU is visible. With a
cached engine, auto loads it at once. Without one, it serves on ONNX Runtime (CPU) from the
first frame while a background thread builds the engine, and switches over when it is ready:
:class:`SwitchingEngine`. Its :meth:`~SwitchingEngine.status` says 'building engine' with the
elapsed seconds (the nodes show it in ``/diagnostics``); the switch is logged once, with the
build time; a failed build is logged and the CPU engine keeps serving. The choice and the
reason are always logged.
"""

import threading
import time

from .base import EngineError, log
from .onnxruntime_backend import OnnxRuntimeEngine
from ..resources import model_form, ORT_INT8_FORMS, sibling_model

BUILDING = 'building engine'
READY = 'ready'
FAILED = 'build failed'


class SwitchingEngine:
    """
    Serve on ``fallback`` while ``build()`` makes the target engine in a thread, then switch.

    ``build`` is any callable returning an engine (the TensorRT engine in production, a fake
    slow builder in tests). Calls to :meth:`infer` never wait for the build and are never
    lost: each runs on whichever engine is current when it starts; the swap waits for the
    call in flight, and the old engine is closed after it.
    """

    def __init__(self, fallback, build, target: str = 'tensorrt', logger=None,
                 clock=time.monotonic, start: bool = True):
        self._engine = fallback
        self._build = build
        self.target = target
        self.logger = logger
        self.clock = clock
        self._swap = threading.Lock()
        self._done = threading.Event()
        self._closed = False
        self.state = BUILDING
        self.error = None
        self.build_s = None
        self.started = clock()
        self.switched_at_call = None
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name='lane_seg-engine-build',
                                        daemon=True)
        if start:
            self._thread.start()

    # The current engine's view (identical tensors on both sides: checked at the switch).
    @property
    def engine(self):
        return self._engine

    @property
    def metadata(self) -> dict:
        return self._engine.metadata

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def precision(self) -> str:
        return self._engine.precision

    @property
    def source(self):
        return getattr(self._engine, 'source', None)

    @property
    def int8_kernels(self):
        return getattr(self._engine, 'int8_kernels', None)

    def input_spec(self):
        return self._engine.input_spec()

    def output_spec(self):
        return self._engine.output_spec()

    def start(self):
        if not self._thread.is_alive() and not self._done.is_set():
            self._thread.start()

    def _run(self):
        fallback = self._engine
        try:
            engine = self._build()
            spec_new, spec_old = engine.output_spec(), fallback.output_spec()
            if (engine.input_spec().name != fallback.input_spec().name
                    or spec_new.name != spec_old.name
                    or tuple(spec_new.shape) != tuple(spec_old.shape)):
                engine.close()
                raise EngineError(f'the {self.target} engine has other tensors than the '
                                  f'{fallback.backend} one ({engine.input_spec()}, '
                                  f'{spec_new}): not switching')
        except Exception as exc:  # noqa: B902 - any build failure keeps the fallback serving
            self.error = f'{type(exc).__name__}: {exc}'
            self.build_s = self.clock() - self.started
            self.state = FAILED
            log(self.logger, 'error', f'{self.target} engine build failed after '
                                      f'{self.build_s:.1f} s ({self.error}); staying on '
                                      f'{fallback.backend}')
            self._done.set()
            return
        build_s = self.clock() - self.started
        with self._swap:
            if self._closed:
                engine.close()
                self._done.set()
                return
            old, self._engine = self._engine, engine
            self.build_s = build_s
            self.switched_at_call = self.calls
            self.state = READY
        log(self.logger, 'info', f'switched from {old.backend} ({old.precision}) to '
                                 f'{engine.backend} ({engine.precision}): engine built in '
                                 f'{build_s:.1f} s, {self.calls} frames served meanwhile')
        old.close()
        self._done.set()

    def infer(self, inputs: dict) -> dict:
        with self._swap:
            if self._closed:
                raise RuntimeError('engine is closed')
            self.calls += 1
            return self._engine.infer(inputs)

    def wait(self, timeout=None) -> bool:
        """Block until the build has finished (switched or failed); False on timeout."""
        return self._done.wait(timeout)

    @property
    def building(self) -> bool:
        return self.state == BUILDING

    def status(self) -> dict:
        """Report the state: 'building engine' (elapsed seconds), 'ready' or 'build failed'."""
        if self.state == BUILDING:
            elapsed = self.clock() - self.started
            message = (f'{BUILDING} ({self.target}, {elapsed:.0f} s elapsed), serving on '
                       f'{self._engine.backend}')
        elif self.state == READY:
            elapsed = self.build_s
            message = f'{self.target} engine ready (built in {elapsed:.1f} s)'
        else:
            elapsed = self.build_s
            message = (f'{self.target} engine build failed ({self.error}); serving on '
                       f'{self._engine.backend}')
        return {'state': self.state, 'elapsed_s': round(float(elapsed), 2),
                'backend': self._engine.backend, 'target': self.target, 'message': message,
                'error': self.error}

    def describe(self) -> dict:
        info = dict(getattr(self._engine, 'describe', dict)())
        info['backend'] = self.backend
        info['switching'] = self.status()
        return info

    def close(self):
        with self._swap:
            self._closed = True
            engine = self._engine
        engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _cpu_form(model):
    """Return the ONNX Runtime form of an int8 model (``*_int8_ort.onnx``) if beside it."""
    if model_form(model) == 'int8_qdq':
        return sibling_model(model, 'int8_ort') or model
    return model


def _tensorrt_form(model):
    """Return the TensorRT form of a model: an ORT int8 model's QDQ sibling, else itself."""
    if model_form(model) in ORT_INT8_FORMS:
        return sibling_model(model, 'int8_qdq')
    return model


def choose_backend(device=None, usable=None) -> tuple:
    """('tensorrt' or 'onnxruntime', reason) for ``backend: auto``."""
    if device == 'cpu':
        return 'onnxruntime', 'device cpu asked for'
    if usable is None:
        from .tensorrt_backend import tensorrt_usable as usable
    ok, why = usable()
    if ok:
        return 'tensorrt', why
    return 'onnxruntime', f'TensorRT not usable ({why})'


def load_auto(model, threads=2, cache_dir=None, device=None, logger=None, usable=None,
              trt_engine=None):
    """
    Load the engine ``backend: auto`` gives for ``model`` (see the module docstring).

    ``usable`` and ``trt_engine(path, build=...)`` default to the TensorRT backend's probe
    and engine class; tests pass stand-ins.
    """
    choice, why = choose_backend(device, usable)
    if choice == 'onnxruntime':
        log(logger, 'info', f'backend auto: onnxruntime on CPU, {why}')
        return OnnxRuntimeEngine(model, threads=threads, device='cpu', logger=logger)
    trt_model = _tensorrt_form(model)
    if trt_model is None:
        log(logger, 'warning', f'backend auto: onnxruntime, {why} but {model} is the ONNX '
                               'Runtime int8 form and its *_int8_qdq.onnx is not beside it')
        return OnnxRuntimeEngine(model, threads=threads, device='cpu', logger=logger)
    if trt_engine is None:
        from .tensorrt_backend import EngineCache, TensorRTEngine

        def trt_engine(path, build):
            if not build and not EngineCache(path, cache_dir, device=device).cached:
                return None
            return TensorRTEngine(path, cache_dir=cache_dir, device=device, logger=logger,
                                  build=build)
    try:
        engine = trt_engine(trt_model, build=False)
    except EngineError as exc:
        log(logger, 'warning', f'backend auto: onnxruntime, {why} but TensorRT cannot take '
                               f'{trt_model}: {exc}')
        return OnnxRuntimeEngine(model, threads=threads, device='cpu', logger=logger)
    if engine is not None:
        log(logger, 'info', f'backend auto: tensorrt, cached engine ({why})')
        return engine
    fallback = OnnxRuntimeEngine(_cpu_form(model), threads=threads, device='cpu', logger=logger)
    log(logger, 'info', f'backend auto: {why}, no cached engine for {trt_model}: serving on '
                        'onnxruntime (CPU) while the TensorRT engine builds in the background')
    return SwitchingEngine(fallback, lambda: trt_engine(trt_model, build=True),
                           target='tensorrt', logger=logger)
