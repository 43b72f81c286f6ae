"""
Checkpoints as safetensors + JSON (never pickle), and models rebuilt from metadata.

A checkpoint ``NAME.safetensors`` holds tensors only: ``model.*`` (the state dict) and, for
resumable training checkpoints, ``optimizer.*`` (flattened optimizer state). ``NAME.json``
beside it holds everything else: the model metadata (``architecture``: type, config and
quantization, so the model can be rebuilt), and for training checkpoints ``epoch``, ``step``,
``scheduler``, RNG states, the optimizer's hyper-parameters, and ``kind``. Writes are atomic
(write to a temporary file, then rename).
"""

import json
import os
from pathlib import Path

KIND_MODEL = 'model'
KIND_TRAINING = 'training'


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def build_model(architecture: dict):
    """Rebuild a (possibly fake-quantized) torch model from ``architecture`` metadata."""
    from .flownet import FlowNetConfig, FlowNetS
    from .quant import quantize_model, QuantConfig
    from .unet import UNet, UNetConfig
    kind = architecture.get('type')
    if kind == 'unet':
        model = UNet(UNetConfig(**architecture['config']))
    elif kind == 'flownets':
        model = FlowNetS(FlowNetConfig(**architecture['config']))
    else:
        raise CheckpointError(f'unknown architecture type {kind!r} (unet, flownets)')
    if architecture.get('quant'):
        quantize_model(model, QuantConfig(**architecture['quant']))
    return model


def _atomic_write(path: Path, write):
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    write(tmp)
    os.replace(tmp, path)


def save(path, model, meta: dict, optimizer=None, extra: dict | None = None):
    """Write ``path`` (.safetensors) and its .json; ``meta`` must hold ``architecture``."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if 'architecture' not in meta:
        raise CheckpointError(f'{path}: metadata needs an architecture entry')
    tensors = {f'model.{k}': v.detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    info = dict(meta)
    info['kind'] = KIND_MODEL
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, pstate in state['state'].items():
            for name, value in pstate.items():
                if hasattr(value, 'shape'):
                    tensors[f'optimizer.{idx}.{name}'] = value.detach().contiguous().cpu()
        info['optimizer'] = {
            'param_groups': state['param_groups'],
            'scalars': {str(idx): {n: float(v) for n, v in p.items() if not hasattr(v, 'shape')}
                        for idx, p in state['state'].items()},
        }
        info['kind'] = KIND_TRAINING
    info.update(extra or {})
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    side = path.with_suffix('.json')
    _atomic_write(side, lambda tmp: tmp.write_text(json.dumps(info, indent=2, sort_keys=True)
                                                   + '\n'))
    return path


def read(path):
    """Return (tensors dict, info dict); refuses truncated or mismatched files clearly."""
    from safetensors.torch import load_file
    path = Path(path)
    side = path.with_suffix('.json')
    if not path.exists():
        raise CheckpointError(f'{path}: checkpoint file does not exist')
    if not side.exists():
        raise CheckpointError(f'{path}: metadata file {side.name} is missing')
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f'{side}: unreadable checkpoint metadata: {exc}') from exc
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: B902 - safetensors raises SafetensorError and others
        raise CheckpointError(f'{path}: corrupt or truncated safetensors file: {exc}') from exc
    return tensors, info


def load_model(path, task=None):
    """Rebuild the model of a checkpoint; returns (model in eval mode, metadata)."""
    tensors, info = read(path)
    if task is not None and info.get('task') != task:
        raise CheckpointError(f'{path}: checkpoint is for task {info.get("task")!r}, '
                              f'not {task!r}')
    if 'architecture' not in info:
        raise CheckpointError(f'{path}: metadata has no architecture entry')
    model = build_model(info['architecture'])
    state = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shape mismatches
        detail = '; '.join(line.strip() for line in str(exc).splitlines()[1:4])
        raise CheckpointError(f'{path}: weights do not match the '
                              f'{info["architecture"].get("type")} architecture: '
                              f'{detail}') from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{path}: weights do not match the {info["architecture"].get("type")} '
            f'architecture: missing {result.missing_keys[:5]}, '
            f'unexpected {result.unexpected_keys[:5]}')
    _restore_quant_flags(model, info)
    layer_bits = info.get('quantization', {}).get('layer_bits')
    if layer_bits:
        from .bitwidth import restore_layer_bits
        restore_layer_bits(model, layer_bits)
    model.eval()
    return model, info


def _restore_quant_flags(model, info):
    """Re-link bias quantizers of a fake-quantized model (the links are not tensors)."""
    import torch
    from .quant import ActQuant, link_bias_quantizers
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for m in quants:
        m.calibrating = False
    if quants:
        shape = [1] + list(info['inputs'][0]['shape'][1:]) if 'inputs' in info else None
        if shape:
            model.eval()
            link_bias_quantizers(model, torch.zeros(*shape))


def restore_optimizer(optimizer, tensors, info):
    """Load the optimizer state saved by ``save`` (tensors + scalars)."""
    import torch
    saved = info.get('optimizer')
    if saved is None:
        raise CheckpointError('checkpoint has no optimizer state')
    state = {}
    for key, value in tensors.items():
        if key.startswith('optimizer.'):
            _, idx, name = key.split('.', 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in saved['scalars'].items():
        state.setdefault(int(idx), {}).update(
            {n: torch.tensor(v) if n == 'step' else v for n, v in scalars.items()})
    optimizer.load_state_dict({'state': state, 'param_groups': saved['param_groups']})
