"""
ONNX Runtime backend: CPU with a thread count (the default here), CUDA or TensorRT providers.

The model's metadata comes from the session itself (``custom_metadata_map['lane_seg']``, the
``.json`` sidecar as fallback) and is validated, then checked against the graph: a model
without metadata, with inconsistent metadata, or whose graph has other tensor names or shapes
than its metadata says, is refused at load time with every problem named.
"""

import json
from pathlib import Path

import numpy as np

from .base import BaseEngine, EngineError, log, precision_of
from ..models.metadata import METADATA_KEY, MetadataError, parse, REQUIRED, sidecar_path

PROVIDERS = {
    'cpu': 'CPUExecutionProvider',
    'cuda': 'CUDAExecutionProvider',
    'tensorrt': 'TensorrtExecutionProvider',
}
GPU_HINT = ('pip install onnxruntime-gpu (in place of onnxruntime), with the CUDA 12 and '
            'cuDNN 9 libraries on the library path')


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineError('the onnxruntime backend needs onnxruntime: pip install onnxruntime '
                          f'(CPU) or onnxruntime-gpu (CUDA) ({exc})') from exc
    # Severity 3 (error): silences the warnings about initializers the graph optimizer folds.
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def _providers(ort, device, cache_dir):
    """List the execution providers for ``device`` (None: CUDA where present, else CPU)."""
    available = ort.get_available_providers()
    if device in (None, 'auto'):
        return (['CUDAExecutionProvider', 'CPUExecutionProvider']
                if 'CUDAExecutionProvider' in available else ['CPUExecutionProvider'])
    if device not in PROVIDERS:
        raise EngineError(f'device {device!r} not one of {sorted(PROVIDERS)} for onnxruntime')
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise EngineError(f'onnxruntime has no {wanted} here (it has {", ".join(available)}): '
                          + GPU_HINT)
    if device == 'tensorrt':
        options = {'trt_int8_enable': True, 'trt_fp16_enable': True,
                   'trt_engine_cache_enable': True}
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            options['trt_engine_cache_path'] = str(cache_dir)
        return [(wanted, options), 'CUDAExecutionProvider', 'CPUExecutionProvider']
    if device == 'cuda':
        return [wanted, 'CPUExecutionProvider']
    return [wanted]


def _twins(ort_form, u8u8_form) -> bool:
    """Whether the u8u8 file was made from this u8s8 file (their .json sidecars say)."""
    try:
        source = json.loads(sidecar_path(ort_form).read_text()).get('weights_sha256')
        made_of = json.loads(sidecar_path(u8u8_form).read_text()).get(
            'quantization', {}).get('u8u8_of_weights_sha256')
    except (OSError, ValueError):
        return False
    return source is not None and source == made_of


def exact_int8_form(path, on_cpu=True, logger=None) -> tuple:
    """
    ``(path, kernels)``: the int8 form of ``path`` that computes exactly on this CPU.

    An ONNX Runtime u8s8 model (``*_int8_ort.onnx``) on an x86 CPU without VNNI is swapped for
    its u8u8 twin (``*_int8_u8u8.onnx``, when its sidecar says it was made from that very
    file), and the reverse with VNNI; ``kernels`` is None for other models and off the CPU.
    """
    from ..resources import form_path, model_form, sibling_model
    from .int8_kernels import int8_kernels
    form = {'int8_ort': 'u8s8', 'int8_u8u8': 'u8u8'}.get(model_form(path))
    if form is None or not on_cpu:
        return path, None
    try:
        kernels, why = int8_kernels()
    except ValueError as exc:
        raise EngineError(str(exc)) from exc
    if kernels == form:
        return path, f'{form} ({why})'
    other = sibling_model(path, 'int8_u8u8' if kernels == 'u8u8' else 'int8_ort')
    if other is not None and not _twins(*((path, other) if form == 'u8s8' else (other, path))):
        log(logger, 'warning', f'{other.name} beside {path.name} was not made from it (their '
                               f'.json sidecars disagree): running {path.name} as given')
        other = None
    if other is None:
        if kernels == 'u8u8':
            log(logger, 'warning', f'{path.name}: {why}, and its exact u8u8 form '
                                   f'{form_path(path, "int8_u8u8").name} is not beside '
                                   f'it: some outputs may be off (re-package the model)')
        return path, f'{form} ({why})'
    log(logger, 'info', f'onnxruntime: {other.name} instead of {path.name} ({why})')
    return other, f'{kernels} ({why})'


def _dims(shape):
    return tuple(v if isinstance(v, int) and v > 0 else None for v in shape)


def graph_problems(meta: dict, graph_inputs, graph_outputs) -> list:
    """Differences between the metadata's tensors and the graph's (name, rank, static dims)."""
    problems = []
    for kind, spec, tensors in (('input', meta['inputs'][0], graph_inputs),
                                ('output', meta['outputs'][0], graph_outputs)):
        names = [t.name for t in tensors]
        if len(tensors) != 1:
            problems.append(f'graph has {len(tensors)} {kind}s {names}, lane_seg models '
                            'have one')
        match = [t for t in tensors if t.name == spec['name']]
        if not match:
            problems.append(f'metadata {kind} {spec["name"]!r} is not in the graph {names}')
            continue
        dims = _dims(match[0].shape)
        want = tuple(spec['shape'])
        if len(dims) != len(want) or any(d is not None and d != w for d, w in zip(dims, want)):
            problems.append(f'{kind} {spec["name"]!r}: graph shape {list(match[0].shape)} '
                            f'!= metadata shape {list(want)}')
    return problems


def model_metadata(session, path) -> dict:
    """Return the validated metadata of a session (embedded, else the sidecar)."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    side = sidecar_path(path)
    if text is None and side.exists():
        text = side.read_text()
    if text is None:
        problems = [f'no {METADATA_KEY!r} metadata entry in the ONNX file and no sidecar '
                    f'{side.name}', 'missing keys: ' + ', '.join(REQUIRED)]
        raise EngineError(f'{path}: refused, the model does not describe itself: '
                          + '; '.join(problems) + '. Export it with '
                          'lane_seg.models.export.export_onnx (or embed_metadata).', problems)
    try:
        return parse(text, path)
    except MetadataError as exc:
        raise EngineError(f'refused: {exc}', exc.problems) from exc


class OnnxRuntimeEngine(BaseEngine):
    """
    One ONNX Runtime session: ``threads`` intra-op threads, all graph optimizations.

    ``spin=True`` lets idle intra-op threads spin-wait (a little lower latency on otherwise
    idle cores, much higher when other processes need them).
    """

    backend = 'onnxruntime'

    def __init__(self, path, threads: int = 2, device=None, cache_dir=None, logger=None,
                 spin: bool = False):
        ort = import_onnxruntime()
        path = Path(path)
        if not path.exists():
            raise EngineError(f'{path}: model file does not exist')
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # No spin-waiting between ops by default: nodes share 2 cores (lanes, flow, camera),
        # and spinning threads then burn the time the others need (measured on a busy 2-core
        # host: 16 ms per frame spinning against 9 ms not).
        opts.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin else '0')
        providers = _providers(ort, device, cache_dir)
        # int8 kernels matter on the CPU provider only (GPU providers take either form alike)
        on_cpu = providers[0] == 'CPUExecutionProvider'
        path, self.int8_kernels = exact_int8_form(path, on_cpu, logger)
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: B902 - ORT raises its own exception types
            raise EngineError(f'{path}: onnxruntime cannot load the model: {exc}') from exc
        meta = model_metadata(session, path)
        problems = graph_problems(meta, session.get_inputs(), session.get_outputs())
        if problems:
            raise EngineError(f'{path}: refused, metadata and graph disagree: '
                              + '; '.join(problems), problems)
        super().__init__(meta, precision_of(meta), path)
        self.session = session
        self.providers = session.get_providers()
        if device in ('cuda', 'tensorrt') and PROVIDERS[device] not in self.providers:
            raise EngineError(f'onnxruntime could not start {PROVIDERS[device]} (running on '
                              f'{self.providers}): ' + GPU_HINT)
        self.threads = opts.intra_op_num_threads
        graph_in = session.get_inputs()[0]
        # The graph's own dims: None where the model was exported with dynamic axes.
        self._input = type(self._input)(graph_in.name, _dims(graph_in.shape),
                                        self._input.dtype, self._input.layout)
        self._output_name = meta['outputs'][0]['name']
        log(logger, 'debug', f'onnxruntime {ort.__version__}: {path.name} on '
                             f'{self.providers[0]}, {self.threads} threads')

    @property
    def device(self) -> str:
        return 'cpu' if self.providers[0] == 'CPUExecutionProvider' else 'cuda'

    def infer(self, inputs: dict) -> dict:
        x = self._input_array(inputs)
        out = self.session.run([self._output_name], {self._input.name: x})[0]
        return {self._output_name: np.asarray(out, np.float32)}

    def describe(self) -> dict:
        info = super().describe()
        info.update(providers=list(self.providers), threads=self.threads)
        if self.int8_kernels:
            info['int8_kernels'] = self.int8_kernels
        return info

    def close(self):
        self.session = None
        super().close()
