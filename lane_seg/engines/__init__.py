"""
Inference engines behind one interface: ONNX Runtime (CPU/CUDA), TensorRT 10 and PyTorch.

``load_engine(model, backend='auto')`` checks at load time that the backend is installed,
the device is there and the model describes itself, and raises :class:`EngineError` naming
what is missing and what to install. Backends are imported lazily: the package and the CPU
path never import torch or tensorrt.
"""

from pathlib import Path

from .base import Engine, EngineError, log, precision_of, TensorSpec

BACKENDS = ('auto', 'onnxruntime', 'tensorrt', 'torch')


def load_engine(model, backend: str = 'auto', threads: int = 2, cache_dir=None, device=None,
                logger=None):
    """
    Load ``model`` (an ONNX file, or a ``.safetensors`` checkpoint for torch) on ``backend``.

    ``threads``: CPU threads (ONNX Runtime intra-op, torch); ``cache_dir``: TensorRT engine
    cache (default ``~/.cache/lane_seg/engines``); ``device``: None (the backend's default),
    'cpu', 'cuda', 'cuda:N' or, for onnxruntime, 'tensorrt' (its TensorRT provider);
    ``logger``: a ``logging.Logger`` or an rclpy logger.
    """
    if backend not in BACKENDS:
        raise EngineError(f'backend {backend!r} not one of {", ".join(BACKENDS)}')
    if model is None:
        raise EngineError('no model given')
    path = Path(model)
    if not path.exists():
        raise EngineError(f'{path}: model file does not exist')
    if path.suffix == '.engine':
        return _load_engine_file(path, backend, device, logger)
    if path.suffix == '.safetensors':
        if backend not in ('auto', 'torch'):
            raise EngineError(f'{path}: a training checkpoint runs on the torch backend, not '
                              f'{backend} (export it to ONNX with `lane-seg export`)')
        backend = 'torch'
        log(logger, 'info', f'{path.name} is a training checkpoint: backend torch')
    if backend == 'onnxruntime':
        from .onnxruntime_backend import OnnxRuntimeEngine
        return OnnxRuntimeEngine(path, threads=threads, device=device, cache_dir=cache_dir,
                                 logger=logger)
    if backend == 'torch':
        from .torch_backend import TorchEngine
        return TorchEngine(path, threads=threads, device=device, logger=logger)
    if backend == 'tensorrt':
        from .auto import _tensorrt_form
        from .tensorrt_backend import TensorRTEngine
        trt_path = _tensorrt_form(path)
        if trt_path is not None and trt_path != path:
            log(logger, 'info', f'tensorrt: using {trt_path.name}, the QDQ form of {path.name}')
            path = trt_path
        return TensorRTEngine(path, cache_dir=cache_dir, device=device, logger=logger)
    from .auto import load_auto
    return load_auto(path, threads=threads, cache_dir=cache_dir, device=device, logger=logger)


def _load_engine_file(path, backend, device, logger):
    """Load a prebuilt TensorRT engine (``.engine`` + ``.json``): only TensorRT runs it."""
    if backend in ('onnxruntime', 'torch'):
        raise EngineError(f'{path} is a TensorRT engine; backend {backend} runs ONNX models '
                          '(pass the .onnx model, or use backend tensorrt or auto)')
    if backend == 'auto':
        from .tensorrt_backend import tensorrt_usable
        ok, why = tensorrt_usable()
        if not ok:
            raise EngineError(f'{path} is a TensorRT engine and TensorRT is not usable here '
                              f'({why}); pass the .onnx model to run on ONNX Runtime')
        log(logger, 'info', f'backend auto: tensorrt, prebuilt engine {path.name} ({why})')
    from .tensorrt_backend import TensorRTEngine
    return TensorRTEngine(path, device=device, logger=logger)


__all__ = ['BACKENDS', 'Engine', 'EngineError', 'TensorSpec', 'load_engine', 'precision_of']
