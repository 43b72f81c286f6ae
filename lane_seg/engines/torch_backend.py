"""
PyTorch backend: the float or fake-quantized model of a checkpoint, on CPU or CUDA.

For reference and parity: it runs ``.safetensors`` checkpoints (``NAME.json`` beside them)
through :func:`lane_seg.models.checkpoint.load_model`. Given an ONNX model instead, it runs
the checkpoint its metadata names under ``checkpoint`` (a path relative to the ONNX file).
torch is imported here only, when the backend is asked for.
"""

from pathlib import Path

import numpy as np

from .base import BaseEngine, EngineError, log, precision_of
from ..models.metadata import MetadataError, read_model_metadata, validate


def checkpoint_for(path) -> Path:
    """Return the ``.safetensors`` checkpoint to run for ``path`` (itself, or its sibling)."""
    path = Path(path)
    if path.suffix == '.safetensors':
        return path
    try:
        meta = read_model_metadata(path)
    except MetadataError as exc:
        raise EngineError(f'refused: {exc}', exc.problems) from exc
    name = meta.get('checkpoint')
    if not name:
        raise EngineError(f'{path}: the torch backend runs .safetensors checkpoints, and this '
                          "model's metadata names no 'checkpoint' to run; pass the checkpoint "
                          'path or use backend onnxruntime')
    ckpt = (path.parent / name).resolve()
    if not ckpt.exists():
        raise EngineError(f'{path}: its checkpoint {ckpt} does not exist')
    return ckpt


def _freeze_weights(model, torch):
    """
    Quantize fake-quantized conv weights once instead of at every call (same numbers).

    ``QConv2d`` re-derives its per-channel scales and rounds its weights in each forward
    pass, which for inference only costs time (several times the convolution itself).
    """
    for module in model.modules():
        if callable(getattr(module, 'quantized_weight', None)) and \
                callable(getattr(module, '_conv_forward', None)):
            with torch.no_grad():
                weight = module.quantized_weight().detach().clone().contiguous()

            def forward(x, module=module, weight=weight):
                return module._conv_forward(x, weight, module.bias)
            module.forward = forward
    return model


class TorchEngine(BaseEngine):
    """A checkpoint's torch module in eval mode under ``torch.inference_mode``."""

    backend = 'torch'

    def __init__(self, path, threads: int = 2, device=None, logger=None):
        try:
            import torch
        except ImportError as exc:
            raise EngineError('the torch backend needs PyTorch: pip install torch '
                              f'(or -r requirements/train.txt) ({exc})') from exc
        try:
            from ..models.checkpoint import CheckpointError, load_model
        except ImportError as exc:
            raise EngineError(f'the torch backend needs lane_seg.models.checkpoint ({exc})') \
                from exc
        ckpt = checkpoint_for(path)
        device = device or 'cpu'
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise EngineError(f'torch backend asked for {device}, but this torch '
                              f'{torch.__version__} sees no CUDA GPU: install a CUDA build of '
                              'torch (pip install torch --index-url '
                              'https://download.pytorch.org/whl/cu124) on a machine with one')
        try:
            model, meta = load_model(ckpt)
        except (CheckpointError, OSError) as exc:
            raise EngineError(f'{ckpt}: cannot load the checkpoint: {exc}') from exc
        try:
            meta = validate({k: v for k, v in meta.items() if k != 'kind'}, ckpt)
        except MetadataError as exc:
            raise EngineError(f'refused: {exc}', exc.problems) from exc
        precision = precision_of(meta)
        if precision == 'int8' and not meta.get('architecture', {}).get('quant'):
            precision = 'fp32'
        super().__init__(meta, precision, ckpt)
        if device == 'cpu':
            torch.set_num_threads(max(1, int(threads)))
        self.torch = torch
        self.device = device
        self.model = _freeze_weights(model.to(device).eval(), torch)
        self._output_name = meta['outputs'][0]['name']
        log(logger, 'debug', f'torch {torch.__version__}: {ckpt.name} on {device}')

    def infer(self, inputs: dict) -> dict:
        x = self._input_array(inputs)
        torch = self.torch
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x).to(self.device))
        return {self._output_name: np.ascontiguousarray(y.float().cpu().numpy())}

    def describe(self) -> dict:
        info = super().describe()
        info.update(device=self.device)
        return info

    def close(self):
        self.model = None
        super().close()
