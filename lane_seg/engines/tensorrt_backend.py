"""
TensorRT 10 backend: int8 engines built from the explicitly quantized (QDQ) ONNX, cached.

Build: the ONNX parser reads the ``*_int8_qdq.onnx`` graph (Q/DQ pairs carry the scales, so no
calibrator), ``BuilderFlag.INT8`` and ``FP16`` let TensorRT pick int8 kernels where the graph
says so and fp16 elsewhere, and one optimization profile pins the input shape. The serialized
engine is cached as ``<cache>/<name>-<key>.engine`` with the model metadata (plus how it was
built) in ``<name>-<key>.json`` beside it; the key is a hash of the model file's bytes, the
TensorRT version, the GPU name, the input shape and the precision, so an engine is rebuilt
exactly when one of them changes. Runtime: the TensorRT 10 tensor API (``set_tensor_address``,
``execute_async_v3``) on a CUDA stream, with pinned host buffers (cuda-python's runtime
bindings) and one warm-up run at load time.

Nothing here imports tensorrt or cuda-python until an engine is asked for; every failure is an
:class:`EngineError` at load time that names what to install.
"""

import hashlib
import json
import os
from pathlib import Path
import time

import numpy as np

from .base import BaseEngine, EngineError, log, precision_of
from ..file_hash import file_sha256
from ..models.metadata import MetadataError, read_model_metadata

TRT_HINT = ('pip install tensorrt (TensorRT 10, on a machine with an NVIDIA GPU and driver; '
            'on Jetson it comes with JetPack)')
CUDA_HINT = 'pip install cuda-python (the CUDA runtime bindings TensorRT engines are run with)'
WORKSPACE_BYTES = 1 << 30
_TRT_LOGGER = []   # one trt.Logger per process (TensorRT warns when builders and runtimes differ)


def default_cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'lane_seg' / 'engines'


def engine_cache_key(model_sha256: str, trt_version: str, gpu_name: str, input_shape,
                     precision: str) -> str:
    """Cache key: changes when the model bytes, TensorRT, the GPU, the shape or precision do."""
    fields = {'model_sha256': model_sha256, 'tensorrt': str(trt_version),
              'gpu': str(gpu_name), 'input_shape': [int(v) for v in input_shape],
              'precision': precision}
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_entry(cache_dir, model_path, key) -> tuple:
    """(engine path, metadata JSON path) of a cache entry."""
    stem = Path(model_path).stem
    base = Path(cache_dir or default_cache_dir())
    return base / f'{stem}-{key}.engine', base / f'{stem}-{key}.json'


def build_precision(meta: dict, precision=None) -> str:
    """Engine precision: int8 for QDQ models, fp16 for float ones unless asked otherwise."""
    model = precision_of(meta)
    if precision is None:
        return 'int8' if model == 'int8' else 'fp16'
    if precision not in ('int8', 'fp16', 'fp32'):
        raise EngineError(f'TensorRT precision {precision!r} not one of int8, fp16, fp32')
    if precision == 'int8' and model != 'int8':
        raise EngineError(f'{meta.get("name")}: a float model cannot be built as int8 without '
                          'calibration; use its *_int8_qdq.onnx (explicit quantization)')
    return precision


def check_model(path, meta: dict):
    """Refuse, before any GPU work, the models TensorRT cannot take as they are."""
    if meta.get('quantization', {}).get('ort_activation_type') == 'uint8':
        from ..resources import form_path
        qdq = form_path(path, 'int8_qdq') or Path(path).with_suffix('.onnx')
        raise EngineError(f'{path} is the ONNX Runtime int8 form (uint8 activations); '
                          f'TensorRT needs the signed QDQ model ({qdq.name})')
    if Path(path).suffix != '.onnx':
        raise EngineError(f'{path}: the tensorrt backend builds engines from ONNX models')


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f'tensorrt not installed: {TRT_HINT} ({exc})') from exc
    return trt


def trt_logger(trt):
    """Return the process's one TensorRT logger (warnings and errors)."""
    if not _TRT_LOGGER:
        _TRT_LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _TRT_LOGGER[0]


def import_cudart():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EngineError(f'the tensorrt backend needs cuda-python: {CUDA_HINT} '
                              f'({exc})') from exc
    return cudart


def cuda_call(result, what='CUDA call'):
    """Unpack cuda-python's ``(error, value...)`` tuples, raising EngineError on failure."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise EngineError(f'{what} failed: {err}')
    return rest[0] if len(rest) == 1 else (rest or None)


def gpu_name(cudart, device: int = 0) -> str:
    count = cuda_call(cudart.cudaGetDeviceCount(), 'cudaGetDeviceCount')
    if not count:
        raise EngineError('no CUDA GPU visible (cudaGetDeviceCount = 0): the tensorrt backend '
                          'needs an NVIDIA GPU and driver; use backend onnxruntime')
    if device >= count:
        raise EngineError(f'GPU {device} asked for, {count} visible')
    props = cuda_call(cudart.cudaGetDeviceProperties(device), 'cudaGetDeviceProperties')
    name = props.name
    return (name.decode(errors='replace') if isinstance(name, bytes) else str(name)).strip('\0')


def tensorrt_usable() -> tuple:
    """Return (True, what) where tensorrt, cuda-python and a GPU are there, else (False, why)."""
    try:
        trt = import_tensorrt()
        cudart = import_cudart()
        name = gpu_name(cudart)
    except EngineError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: B902 - a broken driver raises anything
        return False, f'CUDA is not usable: {exc}'
    return True, f'TensorRT {trt.__version__} on {name}'


def _device_index(device) -> int:
    if device in (None, 'auto', 'cuda'):
        return 0
    if isinstance(device, str) and device.startswith('cuda:'):
        return int(device.split(':', 1)[1])
    raise EngineError(f'device {device!r}: the tensorrt backend runs on cuda or cuda:N')


class EngineCache:
    """Where the engine of (model, precision) on this GPU lives, and how to build it."""

    def __init__(self, model_path, cache_dir=None, precision=None, device=None, logger=None):
        self.model_path = Path(model_path)
        self.logger = logger
        try:
            self.meta = read_model_metadata(self.model_path)
        except MetadataError as exc:
            raise EngineError(f'refused: {exc}', exc.problems) from exc
        check_model(self.model_path, self.meta)
        self.precision = build_precision(self.meta, precision)
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.device = _device_index(device)
        cuda_call(self.cudart.cudaSetDevice(self.device), 'cudaSetDevice')
        self.gpu = gpu_name(self.cudart, self.device)
        self.input_shape = tuple(self.meta['inputs'][0]['shape'])
        self.key = engine_cache_key(file_sha256(self.model_path), self.trt.__version__,
                                    self.gpu, self.input_shape, self.precision)
        self.engine_path, self.json_path = cache_entry(cache_dir, self.model_path, self.key)

    @property
    def cached(self) -> bool:
        return self.engine_path.exists() and self.json_path.exists()

    def build(self) -> Path:
        """Build and write the cache entry (atomically); returns the engine path."""
        trt = self.trt
        t0 = time.monotonic()
        log(self.logger, 'info', f'building the TensorRT {self.precision} engine for '
                                 f'{self.model_path.name} on {self.gpu} (this can take minutes; '
                                 f'cached as {self.engine_path})')
        builder = trt.Builder(trt_logger(trt))
        network = builder.create_network(0)   # TensorRT 10: explicit batch always
        parser = trt.OnnxParser(network, trt_logger(trt))
        if not parser.parse(self.model_path.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f'{self.model_path}: TensorRT cannot parse the ONNX model: '
                              + '; '.join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision in ('int8', 'fp16'):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == 'int8':
            config.set_flag(trt.BuilderFlag.INT8)   # explicit quantization: no calibrator
        spec = self.meta['inputs'][0]
        profile = builder.create_optimization_profile()
        profile.set_shape(spec['name'], self.input_shape, self.input_shape, self.input_shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f'{self.model_path}: TensorRT failed to build the engine (see the '
                              'TensorRT log above)')
        build_s = time.monotonic() - t0
        self.engine_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.engine_path.with_name(f'.{self.engine_path.name}.{os.getpid()}')
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, self.engine_path)
        meta = dict(self.meta, tensorrt={
            'version': trt.__version__, 'gpu': self.gpu, 'precision': self.precision,
            'input_shape': list(self.input_shape), 'key': self.key,
            'source': self.model_path.name, 'build_s': round(build_s, 2)})
        tmp = self.json_path.with_name(f'.{self.json_path.name}.{os.getpid()}')
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')
        os.replace(tmp, self.json_path)
        log(self.logger, 'info', f'built TensorRT {self.precision} engine for '
                                 f'{self.model_path.name} in {build_s:.1f} s: {self.engine_path}')
        return self.engine_path


def build_engine_cache(model_path, precision=None, cache_dir=None, device=None, logger=None,
                       force=False) -> Path:
    """Build the engine cache entry ahead of time (deployment images); returns its path."""
    cache = EngineCache(model_path, cache_dir, precision, device, logger)
    if cache.cached and not force:
        return cache.engine_path
    return cache.build()


class _Binding:
    """Pinned host buffer + device buffer of one I/O tensor."""

    def __init__(self, cudart, name, shape, dtype):
        self.cudart = cudart
        self.name = name
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.host_ptr = cuda_call(cudart.cudaMallocHost(self.nbytes), 'cudaMallocHost')
        self.device_ptr = None
        try:
            self.device_ptr = cuda_call(cudart.cudaMalloc(self.nbytes), 'cudaMalloc')
        except EngineError:
            self.free()
            raise
        buf = np.ctypeslib.as_array(_ctypes_bytes(self.host_ptr, self.nbytes))
        self.host = buf.view(self.dtype).reshape(self.shape)

    def free(self):
        if self.device_ptr is not None:
            self.cudart.cudaFree(self.device_ptr)
            self.device_ptr = None
        if self.host_ptr is not None:
            self.cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = None


def _ctypes_bytes(ptr, nbytes):
    import ctypes
    return (ctypes.c_uint8 * nbytes).from_address(int(ptr))


def prebuilt_engine(path, device=None):
    """
    Check a ``.engine`` file (a cache entry, or one copied into a deployment image).

    Returns ``(metadata, precision, gpu name, trt, cudart, device index)``. Its metadata is
    the ``.json`` beside it; an engine built by another TensorRT version or for another GPU
    is refused (engines are not portable), naming both.
    """
    path = Path(path)
    try:
        meta = read_model_metadata(path)
    except MetadataError as exc:
        raise EngineError(f'refused: {exc} (a TensorRT engine needs the .json the engine '
                          'cache writes beside it)', exc.problems) from exc
    built = meta.get('tensorrt') or {}
    trt = import_tensorrt()
    cudart = import_cudart()
    index = _device_index(device)
    cuda_call(cudart.cudaSetDevice(index), 'cudaSetDevice')
    gpu = gpu_name(cudart, index)
    if built.get('version') != trt.__version__ or built.get('gpu') != gpu:
        raise EngineError(f'{path} was built by TensorRT {built.get("version")} for '
                          f'{built.get("gpu")}; this is TensorRT {trt.__version__} on {gpu}. '
                          'Rebuild it from the ONNX model (engines are not portable)')
    return meta, built.get('precision', precision_of(meta)), gpu, trt, cudart, index


class TensorRTEngine(BaseEngine):
    """
    A TensorRT engine run with the TensorRT 10 tensor API.

    ``path`` is an ONNX model (its cached engine is loaded, or built first when ``build``)
    or a ``.engine`` file with its ``.json`` metadata beside it.
    """

    backend = 'tensorrt'

    def __init__(self, path, cache_dir=None, precision=None, device=None, logger=None,
                 build=True):
        path = Path(path)
        if path.suffix == '.engine':
            meta, precision, self.gpu, trt, cudart, self.device_index = \
                prebuilt_engine(path, device)
            self.engine_path = path
        else:
            cache = EngineCache(path, cache_dir, precision, device, logger)
            if not cache.cached:
                if not build:
                    raise EngineError(f'no cached TensorRT engine for {path} '
                                      f'({cache.engine_path}); build it with lane_seg.engines.'
                                      'tensorrt_backend.build_engine_cache or let backend auto '
                                      'build it')
                cache.build()
            meta, precision, trt, cudart = cache.meta, cache.precision, cache.trt, cache.cudart
            self.gpu, self.device_index, self.engine_path = cache.gpu, cache.device, \
                cache.engine_path
        super().__init__(meta, precision, path)
        self.cudart = cudart
        self._bindings = []
        self._stream = None
        self._runtime = trt.Runtime(trt_logger(trt))
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EngineError(f'{self.engine_path}: TensorRT cannot deserialize the engine '
                              '(corrupt, or built by another TensorRT); delete it to rebuild')
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f'{self.engine_path}: cannot create an execution context '
                              '(out of GPU memory?)')
        try:
            self._setup(trt)
            self._warm_up()
        except Exception:
            self.close()
            raise
        log(logger, 'info', f'TensorRT {trt.__version__} {self.precision} engine '
                            f'{self.engine_path.name} on {self.gpu}')

    def _setup(self, trt):
        engine, context, cudart = self._engine, self._context, self.cudart
        spec_in, spec_out = self.metadata['inputs'][0], self.metadata['outputs'][0]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for want in (spec_in['name'], spec_out['name']):
            if want not in names:
                raise EngineError(f'{self.engine_path}: tensor {want!r} not in the engine '
                                  f'({names})')
        context.set_input_shape(spec_in['name'], tuple(spec_in['shape']))
        self._stream = cuda_call(cudart.cudaStreamCreate(), 'cudaStreamCreate')
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            binding = _Binding(cudart, name, shape, dtype)
            self._bindings.append(binding)
            if not context.set_tensor_address(name, int(binding.device_ptr)):
                raise EngineError(f'set_tensor_address({name!r}) failed')
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._in = binding
            elif name == spec_out['name']:
                self._out = binding
        if tuple(self._out.shape) != tuple(spec_out['shape']):
            raise EngineError(f'{self.engine_path}: engine output shape {self._out.shape} != '
                              f'metadata {spec_out["shape"]}')

    def _run(self):
        cudart, stream = self.cudart, self._stream
        if self.device_index:
            # The runtime API's current device is per thread; the caller's may differ.
            cuda_call(cudart.cudaSetDevice(self.device_index), 'cudaSetDevice')
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaMemcpyAsync(self._in.device_ptr, self._in.host_ptr,
                                         self._in.nbytes, h2d, stream), 'cudaMemcpyAsync')
        if not self._context.execute_async_v3(int(stream)):
            raise RuntimeError('TensorRT execute_async_v3 failed')
        cuda_call(cudart.cudaMemcpyAsync(self._out.host_ptr, self._out.device_ptr,
                                         self._out.nbytes, d2h, stream), 'cudaMemcpyAsync')
        cuda_call(cudart.cudaStreamSynchronize(stream), 'cudaStreamSynchronize')

    def _warm_up(self):
        self._in.host[...] = 0
        self._run()

    def infer(self, inputs: dict) -> dict:
        x = self._input_array(inputs)
        np.copyto(self._in.host, x.reshape(self._in.shape), casting='same_kind')
        self._run()
        return {self._out.name: self._out.host.astype(np.float32, copy=True)}

    def describe(self) -> dict:
        info = super().describe()
        info.update(engine=str(self.engine_path), gpu=self.gpu)
        return info

    def close(self):
        for binding in getattr(self, '_bindings', []):
            binding.free()
        self._bindings = []
        if getattr(self, '_stream', None) is not None:
            self.cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None
        super().close()
