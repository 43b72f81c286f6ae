"""
``lane-seg model info PATH``: what a model says about itself (pure: json, hashlib).

Works on every artefact that carries lane_seg metadata: ONNX files (embedded, else the
``.json`` sidecar), ``.safetensors`` checkpoints and TensorRT engine cache entries (their
sidecars). Invalid or missing metadata raises :class:`~lane_seg.models.metadata.MetadataError`
listing every problem.
"""

import json
from pathlib import Path

from .engines.base import precision_of
from .file_hash import file_sha256
from .models.metadata import read_model_metadata

HEADLINE = ('format', 'task', 'name', 'inputs', 'outputs', 'color_order', 'normalization',
            'roi', 'threshold', 'quantization')


def model_info(path) -> dict:
    """``{'path', 'bytes', 'sha256', 'precision', 'metadata'}`` of a model file."""
    path = Path(path)
    meta = read_model_metadata(path)
    return {'path': str(path), 'bytes': path.stat().st_size, 'sha256': file_sha256(path),
            'precision': precision_of(meta), 'metadata': meta}


def _flat(prefix, value, out):
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flat(f'{prefix}.{key}' if prefix else str(key), value[key], out)
    else:
        out.append((prefix, json.dumps(value) if not isinstance(value, str) else value))


def format_model_info(info: dict) -> str:
    """Human-readable lines: a summary first, then every metadata key flattened."""
    meta = info['metadata']
    spec_in, spec_out = meta['inputs'][0], meta['outputs'][0]
    norm = meta['normalization']
    lines = [
        ('model', f'{meta["name"]} ({meta["task"]}, {info["precision"]})'),
        ('file', f'{info["path"]} ({info["bytes"]} bytes, sha256 {info["sha256"][:16]}...)'),
        ('input', f'{spec_in["name"]} {spec_in["shape"]} {spec_in.get("layout", "NCHW")} '
                  f'{spec_in.get("dtype", "float32")}, {meta["color_order"]}'),
        ('normalization', f'(x * {norm["scale"]:.6g} - mean) / std, mean {norm["mean"]}, '
                          f'std {norm["std"]}'),
        ('output', f'{spec_out["name"]} {spec_out["shape"]} {spec_out["kind"]}'
                   + (f', flow_scale {spec_out["flow_scale"]}' if 'flow_scale' in spec_out
                      else '')),
    ]
    if meta['task'] == 'lane_segmentation':
        roi = meta.get('roi', {'top': 0.0, 'bottom': 1.0, 'left': 0.0, 'right': 1.0})
        lines.append(('roi', ', '.join(f'{k} {roi[k]}' for k in ('top', 'bottom', 'left',
                                                                 'right'))))
        lines.append(('threshold', str(meta.get('threshold', 0.5))))
    rest = []
    for key in sorted(meta):
        if key not in HEADLINE:
            _flat(key, meta[key], rest)
    _flat('quantization', meta['quantization'], rest)
    width = max(len(k) for k, _ in lines + rest)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in lines + rest)
