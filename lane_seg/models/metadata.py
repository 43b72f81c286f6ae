"""
Self-describing models: the metadata every lane_seg model carries, and its validation.

The metadata is one JSON object stored in the ONNX file's ``metadata_props`` under the key
``lane_seg`` (and beside any other artefact as ``<model>.json``). Engines and pipelines
configure themselves from it: input names, shapes and layout, colour order, normalization,
region of interest, output kind and scale. A model without it, or with inconsistent values,
is refused at load time with an error that lists every problem.

Pure module: json, hashlib and numpy only (no onnx, no torch).
"""

import copy
import hashlib
import json
from pathlib import Path

METADATA_KEY = 'lane_seg'
FORMAT = 'lane_seg.model/1'
TASKS = ('lane_segmentation', 'optical_flow')
LAYOUTS = ('NCHW',)
COLOR_ORDERS = ('RGB', 'BGR')
OUTPUT_KINDS = {'lane_segmentation': ('logits', 'probability'), 'optical_flow': ('flow',)}
REQUIRED = ('format', 'task', 'name', 'inputs', 'outputs', 'color_order', 'normalization',
            'quantization', 'training', 'metrics', 'weights_sha256')


class MetadataError(ValueError):
    """A model's metadata is missing or inconsistent; ``problems`` lists every issue."""

    def __init__(self, source, problems):
        self.source = str(source)
        self.problems = list(problems)
        super().__init__(f'{self.source}: invalid lane_seg model metadata: '
                         + '; '.join(self.problems))


def _shape_ok(shape):
    return (isinstance(shape, list) and len(shape) == 4
            and all(isinstance(v, int) and v > 0 for v in shape))


def validate(meta, source='<metadata>') -> dict:
    """Check ``meta`` and return it; raise MetadataError naming every problem found."""
    if not isinstance(meta, dict):
        raise MetadataError(source, ['metadata is not a JSON object'])
    problems = [f'missing key {key!r}' for key in REQUIRED if key not in meta]
    if meta.get('format', FORMAT) != FORMAT:
        problems.append(f"format {meta.get('format')!r} is not {FORMAT!r}")
    task = meta.get('task')
    if 'task' in meta and task not in TASKS:
        problems.append(f'task {task!r} not one of {TASKS}')
    inputs = meta.get('inputs', [])
    outputs = meta.get('outputs', [])
    if 'inputs' in meta and (not isinstance(inputs, list) or len(inputs) != 1):
        problems.append('inputs must list exactly one tensor')
        inputs = []
    if 'outputs' in meta and (not isinstance(outputs, list) or len(outputs) != 1):
        problems.append('outputs must list exactly one tensor')
        outputs = []
    channels = {'lane_segmentation': 3, 'optical_flow': 6}.get(task)
    for spec in inputs:
        for key in ('name', 'shape', 'layout', 'dtype'):
            if key not in spec:
                problems.append(f'input missing {key!r}')
        if 'shape' in spec and not _shape_ok(spec['shape']):
            problems.append(f"input shape {spec['shape']!r} is not 4 positive ints")
        elif 'shape' in spec and channels and spec['shape'][1] != channels:
            problems.append(f"input shape {spec['shape']} must have {channels} channels "
                            f'for {task}')
        if spec.get('layout', 'NCHW') not in LAYOUTS:
            problems.append(f"input layout {spec.get('layout')!r} not one of {LAYOUTS}")
        if spec.get('dtype', 'float32') != 'float32':
            problems.append(f"input dtype {spec.get('dtype')!r} must be float32")
    for spec in outputs:
        for key in ('name', 'shape', 'kind'):
            if key not in spec:
                problems.append(f'output missing {key!r}')
        if 'shape' in spec and not _shape_ok(spec['shape']):
            problems.append(f"output shape {spec['shape']!r} is not 4 positive ints")
        if task in OUTPUT_KINDS and 'kind' in spec and spec['kind'] not in OUTPUT_KINDS[task]:
            problems.append(f"output kind {spec['kind']!r} not one of {OUTPUT_KINDS[task]}")
        if task == 'optical_flow':
            if 'shape' in spec and _shape_ok(spec['shape']) and spec['shape'][1] != 2:
                problems.append('flow output must have 2 channels')
            if not isinstance(spec.get('flow_scale'), (int, float)):
                problems.append('flow output needs a numeric flow_scale (pixels at the input '
                                'resolution per output unit)')
    if 'color_order' in meta and meta['color_order'] not in COLOR_ORDERS:
        problems.append(f"color_order {meta['color_order']!r} not one of {COLOR_ORDERS}")
    norm = meta.get('normalization')
    if 'normalization' in meta:
        if not isinstance(norm, dict) or any(k not in norm for k in ('scale', 'mean', 'std')):
            problems.append('normalization needs scale, mean and std')
        elif (len(norm['mean']) != 3 or len(norm['std']) != 3
              or any(float(s) <= 0 for s in norm['std'])):
            problems.append('normalization mean/std need 3 values, std > 0')
    if task == 'lane_segmentation':
        roi = meta.get('roi', {'top': 0.0, 'bottom': 1.0, 'left': 0.0, 'right': 1.0})
        if not (0.0 <= roi.get('top', -1) < roi.get('bottom', -1) <= 1.0
                and 0.0 <= roi.get('left', -1) < roi.get('right', -1) <= 1.0):
            problems.append(f'roi {roi!r} must be fractions with top < bottom, left < right')
        threshold = meta.get('threshold', 0.5)
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            problems.append(f'threshold {threshold!r} must be in (0, 1)')
    quant = meta.get('quantization')
    if 'quantization' in meta and (not isinstance(quant, dict) or 'scheme' not in quant):
        problems.append('quantization needs a scheme (float32, or a QDQ scheme with bits)')
    if problems:
        raise MetadataError(source, problems)
    return meta


def weights_sha256(blobs) -> str:
    """SHA-256 over the raw bytes of the weight tensors, in the given order."""
    h = hashlib.sha256()
    for blob in blobs:
        h.update(bytes(blob))
    return h.hexdigest()


def dumps(meta) -> str:
    return json.dumps(meta, sort_keys=True, separators=(',', ':'))


def sidecar_path(model_path) -> Path:
    """``model.onnx`` -> ``model.json`` (the metadata file beside any artefact)."""
    path = Path(model_path)
    return path.with_suffix('.json')


def _embedded_onnx_metadata(path: Path):
    """Return the raw ``lane_seg`` metadata string of an ONNX file, or None."""
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
        else:
            import onnxruntime as ort
            session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
            props = session.get_modelmeta().custom_metadata_map
    except Exception as exc:  # noqa: B902 - protobuf and ORT raise many kinds
        raise MetadataError(path, [f'cannot read ONNX file: {exc}']) from exc
    return props.get(METADATA_KEY)


def parse(text, source) -> dict:
    """Parse and validate a metadata JSON string."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(source, [f'lane_seg metadata is not JSON: {exc}']) from exc
    return validate(meta, source)


def read_model_metadata(path) -> dict:
    """
    Read and validate the metadata of a model file (ONNX, or any file with a sidecar).

    ONNX files carry it inside (``metadata_props['lane_seg']``); the ``.json`` sidecar is the
    fallback, and the only source for other artefacts (checkpoints, engine cache entries).
    """
    path = Path(path)
    if not path.exists():
        raise MetadataError(path, ['model file does not exist'])
    text = _embedded_onnx_metadata(path) if path.suffix == '.onnx' else None
    if text is None:
        side = sidecar_path(path)
        if not side.exists():
            raise MetadataError(path, [f'no {METADATA_KEY!r} metadata entry and no sidecar '
                                       f'{side.name}; missing keys: {", ".join(REQUIRED)}'])
        try:
            text = side.read_text()
        except OSError as exc:
            raise MetadataError(side, [f'unreadable: {exc}']) from exc
    return parse(text, path)


def input_hw(meta):
    """(height, width) the model takes."""
    shape = meta['inputs'][0]['shape']
    return shape[2], shape[3]


def with_updates(meta, **changes) -> dict:
    out = copy.deepcopy(meta)
    out.update(changes)
    return out
