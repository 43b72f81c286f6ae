"""
``lane-seg bench``: latency, throughput, accuracy and memory of every model x backend here.

For each shipped model (or each ``--models`` path) and each backend available on the machine
(onnxruntime; torch where installed; tensorrt where usable, float models built as fp16), and
for OpenCV's classical flow methods (DIS ultrafast/fast/medium, Farneback), it measures on a
synthetic drive rendered like CARLA's camera (800x600 ``bgra8``, a held-out seed):

- latency of the whole pipeline call (frame in, full-resolution mask or flow out): median,
  p95, p99, and the throughput of one stream (1000 / mean ms); the per-stage split
  (pre-processing, inference, post-processing, medians);
- peak memory: a separate process per configuration loads it and runs a few frames and
  reports its peak resident set (VmHWM; ``resource.getrusage`` ``ru_maxrss`` too, which on
  Linux also counts the parent's size at fork), and one process runs both int8 pipelines
  without torch imported (the production node set-up);
- accuracy on the same frames: lane IoU (pooled counts, ``lane_seg.metrics``) against the exact
  boundary masks, flow EPE and Fl-all against the exact flow;
- parameters and MACs (metadata, else counted from the ONNX graph's convolutions) and the
  fraction of the hardware's peak: MACs per second during inference against
  ``threads x clock x MACs per cycle per core`` (see :func:`cpu_peak`).

Writes ``bench.json``, ``bench.md`` and ``latency_hist.png`` / ``accuracy_vs_latency.png``
into ``--out`` and names the machine. ``python -m lane_seg.bench --probe JSON`` is the
memory probe (internal).
"""

from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

TARGETS = {'lanes_int8_e2e_median_ms': 12.0, 'lanes_int8_pre_post_ms': 3.0,
           'flow_int8_e2e_median_ms': 30.0, 'both_int8_peak_rss_mb': 400.0}
OPENCV_METHODS = ('dis_ultrafast', 'dis_fast', 'dis_medium', 'farneback')
DEFAULT_SIZE = (600, 800)
DEFAULT_SEED = 1000        # a drive no shipped model was trained on
MAX_DISTINCT_FRAMES = 16   # frames rendered (800x600 takes ~0.7 s each); timing cycles them
TORCH_MAX_FRAMES = 20      # the torch reference is slow on CPU: fewer timed frames


@dataclass
class Config:
    """One measured configuration."""

    name: str
    task: str                 # 'lanes' or 'flow'
    backend: str              # onnxruntime, torch, tensorrt, opencv
    precision: str
    model: str = ''
    method: str = ''          # OpenCV method
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- machine

def _cpuinfo() -> dict:
    info = {'model': None, 'mhz': None, 'flags': set()}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and info['model'] is None:
                    info['model'] = value.strip()
                elif key == 'cpu MHz' and info['mhz'] is None:
                    info['mhz'] = float(value)
                elif key == 'flags' and not info['flags']:
                    info['flags'] = set(value.split())
    except OSError:
        pass
    info['model'] = info['model'] or platform.processor() or 'unknown'
    return info


def cpu_peak(threads: int) -> dict:
    """
    Return the CPU's peak multiply-accumulates per second on ``threads`` cores (int8, fp32).

    ``cores x clock x MACs per cycle per core``, with the clock from /proc/cpuinfo ('cpu MHz'
    of the first core) and MACs per cycle from the instruction set: int8 64 with AVX-512 VNNI
    (one 512-bit VPDPBUSD: 16 lanes x 4 byte products), 32 with AVX-VNNI or AVX2 (256 bits);
    fp32 32 with AVX-512 (two 16-lane FMA units), 16 with AVX2 FMA. An upper bound: turbo
    clocks, one FMA unit on some parts and memory stalls all lower what is reachable.
    """
    info = _cpuinfo()
    flags = info['flags']
    if 'avx512_vnni' in flags:
        int8, isa8 = 64, 'AVX-512 VNNI'
    elif 'avx_vnni' in flags:
        int8, isa8 = 32, 'AVX-VNNI'
    else:
        int8, isa8 = 32, 'AVX2'
    fp32, isa32 = (32, 'AVX-512 FMA') if 'avx512f' in flags else (16, 'AVX2 FMA')
    cores = min(int(threads), os.cpu_count() or 1)
    mhz = info['mhz'] or 0.0
    return {
        'cores': cores, 'mhz': mhz,
        'int8_macs_per_cycle': int8, 'fp32_macs_per_cycle': fp32,
        'int8_peak_gmacs': cores * mhz * 1e6 * int8 / 1e9,
        'fp32_peak_gmacs': cores * mhz * 1e6 * fp32 / 1e9,
        'how': (f'{cores} cores x {mhz:.0f} MHz x {int8} int8 MACs/cycle ({isa8}) or {fp32} '
                f'fp32 MACs/cycle ({isa32}); achieved = model MACs / median inference time'),
    }


def _version(dist):
    from importlib import metadata
    for name in (dist,) if isinstance(dist, str) else dist:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpu() -> str:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().replace('\n', '; ')
    except (OSError, subprocess.SubprocessError):
        pass
    return 'none'


def _int8_kernels() -> tuple:
    from .engines.int8_kernels import int8_kernels
    try:
        kernels, why = int8_kernels()
    except ValueError as exc:
        return 'invalid', f'({exc})'
    return kernels, f'({why})'


def machine(threads: int) -> dict:
    import cv2
    info = _cpuinfo()
    return {
        'cpu': info['model'], 'cpu_mhz': info['mhz'], 'logical_cpus': os.cpu_count(),
        'usable_cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
        else os.cpu_count(),
        'threads': threads,
        'isa': sorted(f for f in info['flags'] if f in ('avx2', 'avx512f', 'avx512_vnni',
                                                        'avx_vnni', 'amx_int8')),
        'int8_kernels': ' '.join(_int8_kernels()),
        'gpu': _gpu(), 'os': platform.platform(), 'python': platform.python_version(),
        'load_average_1min': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
        'versions': {'numpy': np.__version__, 'opencv': cv2.__version__,
                     'onnxruntime': _version('onnxruntime') or _version('onnxruntime-gpu'),
                     'torch': _version('torch'), 'tensorrt': _version('tensorrt'),
                     'lane_seg': _version('lane_seg')},
    }


# ------------------------------------------------------------------------ model sizes

def _find_number(meta: dict, names) -> float:
    for scope in (meta, meta.get('metrics', {}), meta.get('architecture', {}) or {},
                  meta.get('model', {}) if isinstance(meta.get('model'), dict) else {}):
        for name in names:
            value = scope.get(name) if isinstance(scope, dict) else None
            if isinstance(value, (int, float)) and value > 0:
                return value
    return None


def onnx_conv_stats(path) -> dict:
    """Parameters and MACs of the convolutions of an ONNX graph (needs the onnx package)."""
    try:
        import onnx
        from onnx import numpy_helper, shape_inference
    except ImportError:
        return {}
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    consts = {}
    for node in graph.node:
        if node.op_type == 'Constant':
            for attr in node.attribute:
                if attr.name == 'value':
                    consts[node.output[0]] = numpy_helper.to_array(attr.t).shape
    producers = {out: n for n in graph.node for out in n.output}
    shapes = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims

    def weight_shape(name, depth=0):
        if name in inits:
            return inits[name]
        if name in consts:
            return consts[name]
        node = producers.get(name)
        if node is not None and depth < 4 and node.op_type in (
                'DequantizeLinear', 'QuantizeLinear', 'Identity', 'Cast'):
            return weight_shape(node.input[0], depth + 1)
        return None

    params = macs = 0
    for node in graph.node:
        if node.op_type not in ('Conv', 'ConvTranspose'):
            continue
        w = weight_shape(node.input[1])
        if w is None:
            return {}
        params += int(np.prod(w)) + (int(w[0 if node.op_type == 'Conv' else 1])
                                     if len(node.input) > 2 and node.input[2] else 0)
        ref = node.output[0] if node.op_type == 'Conv' else node.input[0]
        if ref not in shapes:
            return {}
        macs += int(np.prod(shapes[ref][1:])) * int(np.prod(w[1:]))
    return {'params': params, 'macs': macs}


def model_size(path, meta: dict) -> dict:
    params = _find_number(meta, ('parameters', 'params', 'num_parameters'))
    macs = _find_number(meta, ('macs', 'MACs', 'mac'))
    source = 'metadata'
    if (params is None or macs is None) and str(path).endswith('.onnx'):
        counted = onnx_conv_stats(path)
        params = params or counted.get('params')
        macs = macs or counted.get('macs')
        source = 'counted from the ONNX graph (convolutions)'
    return {'params': params, 'macs': macs, 'source': source if macs else None}


# ---------------------------------------------------------------------------- frames

@dataclass
class FrameSet:
    """Rendered frames (bgra8) with ground truth; timing cycles through them."""

    images: list
    lanes: list        # uint8 (H, W) 0/1
    flows: list        # flow from frame i to i + 1
    valid: list
    stamps: list
    size: tuple
    seed: int


def render_frames(count: int, size=DEFAULT_SIZE, seed=DEFAULT_SEED, progress=None) -> FrameSet:
    import cv2
    from .sim import DriveConfig, SyntheticDrive
    drive = SyntheticDrive(DriveConfig.sized(seed, size[0], size[1]))
    images, lanes, flows, valid, stamps = [], [], [], [], []
    for frame in drive.frames(count):
        images.append(cv2.cvtColor(frame.image, cv2.COLOR_BGR2BGRA))
        lanes.append(frame.lane_binary)
        flows.append(frame.flow)
        valid.append(frame.flow_valid)
        stamps.append(frame.stamp)
        if progress is not None:
            progress.update(1)
    return FrameSet(images, lanes, flows, valid, stamps, tuple(size), seed)


# ------------------------------------------------------------------------ configurations

def available_backends() -> list:
    found = ['onnxruntime']
    if _version('torch'):
        found.append('torch')
    try:
        from .engines.tensorrt_backend import tensorrt_usable
        if tensorrt_usable()[0]:
            found.append('tensorrt')
    except Exception:  # noqa: B902 - a broken CUDA install: no tensorrt column
        pass
    return found


def _resolve_models(models) -> list:
    """Model names ('lanes', 'flow': shipped fp32 and int8) or paths -> [(path, note)]."""
    from .resources import ResourceError, shipped_model
    found = []
    for item in models:
        if item in ('lanes', 'flow'):
            for precision in ('fp32', 'int8'):
                try:
                    found.append((shipped_model(item, precision), ''))
                except ResourceError as exc:
                    found.append((None, str(exc)))
        else:
            found.append((Path(item), ''))
    return found


def plan(models=None, backends=None) -> tuple:
    """(configs, skipped notes) for the model x backend x precision grid."""
    from .engines.base import precision_of
    from .models.metadata import MetadataError, read_model_metadata
    from .resources import model_form, ORT_INT8_FORMS, sibling_model
    backends = list(backends or available_backends())
    configs, skipped = [], []
    for path, note in _resolve_models(models or ['lanes', 'flow']):
        if path is None:
            skipped.append(note)
            continue
        try:
            meta = read_model_metadata(path)
        except MetadataError as exc:
            skipped.append(str(exc))
            continue
        task = 'lanes' if meta['task'] == 'lane_segmentation' else 'flow'
        precision = precision_of(meta)
        for backend in backends:
            model, label, notes = Path(path), precision, []
            if backend == 'tensorrt':
                if model_form(model) in ORT_INT8_FORMS:
                    model = sibling_model(model, 'int8_qdq')
                    if model is None:
                        skipped.append(f'{path.name} x tensorrt: no *_int8_qdq.onnx beside it')
                        continue
                label = 'int8' if precision == 'int8' else 'fp16'
            elif backend == 'torch':
                if model.suffix == '.onnx' and not meta.get('checkpoint'):
                    skipped.append(f'{path.name} x torch: no checkpoint named in its metadata')
                    continue
                if precision == 'int8':
                    label = 'int8'
                    notes.append('fake-quantized (int8 values, float arithmetic)')
            elif backend == 'onnxruntime':
                # the file the engine will run on this CPU (u8s8 or u8u8 twin), named as such
                from .engines.onnxruntime_backend import exact_int8_form
                model, kernels = exact_int8_form(model)
                if kernels:
                    notes.append(f'int8 kernels {kernels}')
                if any(c.model == str(model) and c.backend == backend for c in configs):
                    skipped.append(f'{path.name} x onnxruntime: runs as {model.name}, already '
                                   'in the grid')
                    continue
            else:
                skipped.append(f'backend {backend!r} unknown')
                continue
            form = model_form(model)
            suffix = (f' ({form.split("_")[-1]})' if backend == 'onnxruntime'
                      and form in ORT_INT8_FORMS else '')
            configs.append(Config(name=f'{meta.get("name", path.stem)} / {backend} / {label}'
                                  + suffix,
                                  task=task, backend=backend, precision=label,
                                  model=str(model), notes=notes))
    # torch last: importing it changes nothing for the others, but keep them clean.
    configs.sort(key=lambda c: (c.backend == 'torch', c.task, c.backend, c.precision))
    return configs, skipped


def opencv_configs() -> list:
    return [Config(name=f'OpenCV {m.replace("_", " ")}', task='flow', backend='opencv',
                   precision='fp32', method=m) for m in OPENCV_METHODS]


# ------------------------------------------------------------------------------ running

def latency_stats(values) -> dict:
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        return {}
    return {'median_ms': float(np.median(arr)), 'p95_ms': float(np.percentile(arr, 95)),
            'p99_ms': float(np.percentile(arr, 99)), 'mean_ms': float(arr.mean()),
            'min_ms': float(arr.min()), 'fps': float(1000.0 / arr.mean())}


class OpenCVFlow:
    """DIS or Farneback behind the flow pipeline's call signature (grayscale, full size)."""

    def __init__(self, method: str):
        import cv2
        self.cv2 = cv2
        self.method = method
        self.prev = None
        if method.startswith('dis_'):
            preset = {'dis_ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                      'dis_fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
                      'dis_medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[method]
            self.dis = cv2.DISOpticalFlow_create(preset)
        self.last_reset = None

    def reset(self, reason='first frame'):
        self.prev = None

    def __call__(self, image, encoding, stamp_s):
        cv2 = self.cv2
        t0 = time.perf_counter()
        gray = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        t1 = time.perf_counter()
        prev, self.prev = self.prev, gray
        if prev is None:
            return None
        if self.method == 'farneback':
            flow = cv2.calcOpticalFlowFarneback(prev, gray, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        else:
            flow = self.dis.calc(prev, gray, None)
        t2 = time.perf_counter()
        return _Result(flow, {'preprocess': (t1 - t0) * 1e3, 'inference': (t2 - t1) * 1e3,
                              'postprocess': 0.0})

    def close(self):
        pass


@dataclass
class _Result:
    flow: np.ndarray
    timings: dict


def _open(cfg: Config, threads: int):
    if cfg.backend == 'opencv':
        return OpenCVFlow(cfg.method)
    if cfg.task == 'lanes':
        from .pipeline.lanes import LanePipeline
        return LanePipeline.from_model(cfg.model, backend=cfg.backend, threads=threads)
    from .pipeline.flow import FlowPipeline
    return FlowPipeline.from_model(cfg.model, backend=cfg.backend, threads=threads,
                                   max_gap_s=None)


def run_config(cfg: Config, frames: FrameSet, count: int, threads: int, warmup: int = 3,
               progress=None) -> dict:
    """Latency, per-stage times and accuracy of one configuration."""
    from . import metrics
    pipe = _open(cfg, threads)
    n = len(frames.images)
    e2e, stages = [], {'preprocess': [], 'inference': [], 'postprocess': []}
    counts = np.zeros(3, np.int64)
    epe_sum = epe_n = fl_sum = 0.0
    try:
        if cfg.task == 'lanes':
            for i in range(warmup):
                pipe(frames.images[i % n], 'bgra8')
            for i in range(count):
                t0 = time.perf_counter()
                res = pipe(frames.images[i % n], 'bgra8')
                e2e.append((time.perf_counter() - t0) * 1e3)
                for k in stages:
                    stages[k].append(res.timings[k])
                if i < n:
                    counts += metrics.lane_counts(res.mask, frames.lanes[i])
                if progress is not None:
                    progress.update(1)
            accuracy = {'lane_iou': metrics.iou_from_counts(*counts),
                        'lane_f1': metrics.f1_from_counts(*counts), 'frames': min(count, n)}
        else:
            for i in range(warmup + 1):
                pipe(frames.images[i % n], 'bgra8', frames.stamps[i % n])
            pipe.reset()
            done = i = 0
            while done < count:
                k = i % n
                if k == 0:
                    pipe.reset()
                t0 = time.perf_counter()
                res = pipe(frames.images[k], 'bgra8', frames.stamps[k])
                ms = (time.perf_counter() - t0) * 1e3
                i += 1
                if res is None:
                    continue
                e2e.append(ms)
                for s in stages:
                    stages[s].append(res.timings[s])
                if i <= n:   # first pass: frame k - 1 -> k has ground truth flows[k - 1]
                    valid = frames.valid[k - 1]
                    w = metrics.flow_valid_count(frames.flows[k - 1], valid)
                    if w:
                        epe_sum += metrics.epe(res.flow, frames.flows[k - 1], valid) * w
                        fl_sum += metrics.fl_all(res.flow, frames.flows[k - 1], valid) * w
                        epe_n += w
                done += 1
                if progress is not None:
                    progress.update(1)
            accuracy = {'epe_px': epe_sum / epe_n if epe_n else None,
                        'fl_all': fl_sum / epe_n if epe_n else None,
                        'pairs': min(count, n - 1)}
        info = pipe.describe() if hasattr(pipe, 'describe') else {}
    finally:
        pipe.close()
    result = {'latency': latency_stats(e2e),
              'stages_median_ms': {k: float(np.median(v)) for k, v in stages.items() if v},
              'accuracy': accuracy, 'frames_timed': len(e2e),
              'e2e_ms': [round(v, 3) for v in e2e]}
    if info:
        result['pipeline'] = {k: v for k, v in info.items()
                              if isinstance(v, (str, int, float, type(None)))}
    return result


# ------------------------------------------------------------------------------ memory

def _probe(spec: dict) -> dict:
    """Run in a fresh process: load the pipelines of ``spec``, run frames, report the peak."""
    import resource
    frames = np.load(spec['frames'])
    pipes = []
    for item in spec['pipelines']:
        cfg = Config(**item)
        pipes.append((cfg, _open(cfg, spec['threads'])))
    for i, image in enumerate(frames):
        for cfg, pipe in pipes:
            if cfg.task == 'lanes':
                pipe(image, 'bgra8')
            else:
                pipe(image, 'bgra8', i * 0.05)
    for _, pipe in pipes:
        pipe.close()
    ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    hwm = _vm_hwm_mb()
    return {'peak_rss_mb': hwm if hwm is not None else ru_maxrss_mb,
            'ru_maxrss_mb': ru_maxrss_mb,
            'source': 'VmHWM' if hwm is not None else 'ru_maxrss',
            'torch_imported': 'torch' in sys.modules}


def _vm_hwm_mb():
    """
    Return this process's peak resident set in MB (VmHWM), None off Linux.

    Preferred to ``ru_maxrss``: Linux carries ``ru_maxrss`` over fork + exec, so a probe
    started by a large parent (the benchmark, after importing torch) would report at least
    the parent's size; VmHWM belongs to the new address space only.
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def measure_memory(configs, frames: FrameSet, threads: int, workdir) -> dict:
    """Peak RSS of a fresh process running ``configs`` together on a few frames."""
    path = Path(workdir) / 'probe_frames.npy'
    if not path.exists():
        np.save(path, np.stack(frames.images[:3]))
    spec = {'frames': str(path), 'threads': threads,
            'pipelines': [{'name': c.name, 'task': c.task, 'backend': c.backend,
                           'precision': c.precision, 'model': c.model, 'method': c.method}
                          for c in configs]}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-m', 'lane_seg.bench', '--probe', json.dumps(spec)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or ['failed'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ reports

def _fmt(value, digits=2, unit=''):
    if value is None:
        return 'n/a'
    if isinstance(value, float) and not np.isfinite(value):
        return 'n/a'
    return f'{value:.{digits}f}{unit}'


def _si(value):
    if not value:
        return 'n/a'
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if value >= div:
            return f'{value / div:.2f}{suffix}'
    return str(int(value))


def markdown(report: dict) -> str:
    m = report['machine']
    lines = [
        '# lane-seg bench', '',
        f'Machine: {m["cpu"]}, {m["usable_cpus"]} usable of {m["logical_cpus"]} logical CPUs '
        f'at {_fmt(m["cpu_mhz"], 0)} MHz ({", ".join(m["isa"]) or "no AVX-512"}), GPU: '
        f'{m["gpu"]}; ONNX Runtime int8 kernels '
        f'{m.get("int8_kernels", "u8s8 (not recorded)")}; {report["threads"]} threads; '
        'load average '
        f'{_fmt(m.get("load_average_1min"))} at the start. Python {m["python"]}, '
        + ', '.join(f'{k} {v}' for k, v in m['versions'].items() if v) + '.', '',
        f'Frames: synthetic drive seed {report["frames"]["seed"]}, '
        f'{report["frames"]["size"][1]}x{report["frames"]["size"][0]} bgra8 '
        f'({report["frames"]["distinct"]} distinct, {report["frames"]["timed"]} timed per '
        f'configuration, at most {TORCH_MAX_FRAMES} for torch). Latency: the whole pipeline '
        'call (frame in, full-resolution mask or flow out). Accuracy: lane IoU against the '
        'exact boundary masks; flow EPE (px) and '
        'Fl-all against the exact flow.', '',
        f'Peak fraction: {report["peak"]["how"]}.', '',
        '| configuration | median ms | p95 | p99 | fps | pre | infer | post | peak MB '
        '| accuracy | params | MACs | % of peak |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in report['results']:
        lat = r.get('latency', {})
        st = r.get('stages_median_ms', {})
        acc = r.get('accuracy', {})
        if 'lane_iou' in acc:
            acc_text = f'IoU {_fmt(acc["lane_iou"], 3)}'
        elif acc.get('epe_px') is not None:
            acc_text = f'EPE {_fmt(acc["epe_px"], 2)} px, Fl {_fmt(100 * acc["fl_all"], 1)} %'
        else:
            acc_text = 'n/a'
        mem = r.get('memory', {})
        frac = r.get('peak_fraction')
        lines.append(
            f'| {r["name"]} | {_fmt(lat.get("median_ms"))} | {_fmt(lat.get("p95_ms"))} '
            f'| {_fmt(lat.get("p99_ms"))} | {_fmt(lat.get("fps"), 1)} '
            f'| {_fmt(st.get("preprocess"))} | {_fmt(st.get("inference"))} '
            f'| {_fmt(st.get("postprocess"))} | {_fmt(mem.get("peak_rss_mb"), 0)} '
            f'| {acc_text} | {_si(r.get("params"))} | {_si(r.get("macs"))} '
            f'| {_fmt(None if frac is None else 100 * frac, 1)} |')
        if r.get('error'):
            lines[-1] = f'| {r["name"]} | failed: {r["error"]} |' + ' |' * 11
    both = report.get('memory_both_int8')
    if both:
        lines += ['', 'Both int8 pipelines (lanes + flow, onnxruntime) in one process: peak '
                  f'{_fmt(both.get("peak_rss_mb"), 0)} MB, torch imported: '
                  f'{both.get("torch_imported")}.']
    if report.get('targets'):
        lines += ['', '## Targets (issue 5, 2 CPU cores)', '',
                  '| target | limit | measured | ok |', '|---|---|---|---|']
        for t in report['targets']:
            lines.append(f'| {t["target"]} | {t["limit"]} | {_fmt(t["measured"])} '
                         f'| {"yes" if t["ok"] else "NO" if t["ok"] is False else "n/a"} |')
    if report.get('skipped'):
        lines += ['', 'Not measured: ' + '; '.join(report['skipped']) + '.']
    return '\n'.join(lines) + '\n'


def plots(report: dict, out: Path) -> list:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    results = [r for r in report['results'] if r.get('e2e_ms')]
    written = []
    fig, axes = plt.subplots(2, 1, figsize=(9, 7))
    for ax, task in zip(axes, ('lanes', 'flow')):
        for r in results:
            if r['task'] == task:
                ax.hist(r['e2e_ms'], bins=30, alpha=0.55, label=r['name'])
        ax.set_title(f'{task}: end-to-end latency per frame')
        ax.set_xlabel('ms')
        ax.set_ylabel('frames')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / 'latency_hist.png'
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, task, key, label in ((axes[0], 'lanes', 'lane_iou', 'lane IoU (higher is better)'),
                                 (axes[1], 'flow', 'epe_px', 'EPE px (lower is better)')):
        for r in results:
            value = r.get('accuracy', {}).get(key)
            if r['task'] == task and value is not None:
                ax.scatter(r['latency']['median_ms'], value)
                ax.annotate(r['name'], (r['latency']['median_ms'], value), fontsize=7)
        ax.set_xlabel('median end-to-end latency, ms')
        ax.set_ylabel(label)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / 'accuracy_vs_latency.png'
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _targets(report: dict) -> list:
    def find(task):
        for r in report['results']:
            if (r['task'] == task and r['backend'] == 'onnxruntime' and r['precision'] == 'int8'
                    and r.get('latency')):
                return r
        return None
    lanes, flow = find('lanes'), find('flow')
    both = report.get('memory_both_int8') or {}
    rows = [
        ('lanes int8 end-to-end median ms', TARGETS['lanes_int8_e2e_median_ms'],
         lanes and lanes['latency']['median_ms']),
        ('lanes int8 pre + post ms (medians)', TARGETS['lanes_int8_pre_post_ms'],
         lanes and (lanes['stages_median_ms']['preprocess']
                    + lanes['stages_median_ms']['postprocess'])),
        ('flow int8 end-to-end median ms', TARGETS['flow_int8_e2e_median_ms'],
         flow and flow['latency']['median_ms']),
        ('both int8 pipelines peak MB (no torch)', TARGETS['both_int8_peak_rss_mb'],
         both.get('peak_rss_mb')),
    ]
    return [{'target': name, 'limit': limit, 'measured': value,
             'ok': None if value is None else bool(value <= limit)}
            for name, limit, value in rows]


# --------------------------------------------------------------------------------- main

def run_bench(models=None, backends=None, frames: int = 100, out='docs/bench', threads: int = 2,
              size=DEFAULT_SIZE, seed: int = DEFAULT_SEED, opencv: bool = True,
              memory: bool = True, progress: bool = True, warmup: int = 3) -> dict:
    """Measure every configuration; write bench.json, bench.md and the plots into ``out``."""
    import cv2
    from tqdm import tqdm
    cv2.setNumThreads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs, skipped = plan(models, backends)
    if opencv:   # before torch: importing torch starts thread pools in this process
        configs = ([c for c in configs if c.backend != 'torch'] + opencv_configs()
                   + [c for c in configs if c.backend == 'torch'])
    if not configs:
        raise ValueError('nothing to measure: ' + ('; '.join(skipped) or 'no models'))
    distinct = max(2, min(frames + 1, MAX_DISTINCT_FRAMES))
    counts = [min(frames, TORCH_MAX_FRAMES) if c.backend == 'torch' else frames
              for c in configs]
    bar = tqdm(total=distinct + sum(counts), disable=not progress, unit='frame',
               desc='rendering')
    frameset = render_frames(distinct, size, seed, bar)
    peak = cpu_peak(threads)
    host = machine(threads)   # before the runs: the load average says how busy the host was
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg, count in zip(configs, counts):
            bar.set_description(cfg.name[:40])
            entry = {'name': cfg.name, 'task': cfg.task, 'backend': cfg.backend,
                     'precision': cfg.precision, 'model': cfg.model, 'method': cfg.method,
                     'notes': cfg.notes}
            try:
                entry.update(run_config(cfg, frameset, count, threads, warmup, bar))
            except Exception as exc:  # noqa: B902 - one failing config must not stop the rest
                entry['error'] = f'{type(exc).__name__}: {exc}'
                results.append(entry)
                continue
            if cfg.model:
                from .models.metadata import read_model_metadata
                entry.update(model_size(cfg.model, read_model_metadata(cfg.model)))
                infer_s = entry['stages_median_ms'].get('inference', 0) / 1e3
                if entry.get('macs') and infer_s > 0 and cfg.backend != 'tensorrt':
                    per_s = entry['macs'] / infer_s
                    entry['achieved_gmacs'] = per_s / 1e9
                    # fake-quantized torch computes in float: compare with the fp32 peak
                    int8 = cfg.precision == 'int8' and cfg.backend == 'onnxruntime'
                    ref = peak['int8_peak_gmacs' if int8 else 'fp32_peak_gmacs']
                    if int8 and ref and cfg.model.endswith('_int8_u8u8.onnx'):
                        ref /= 2   # u8u8 kernels widen to 16 bits first: half the u8s8 rate
                    entry['peak_fraction'] = per_s / 1e9 / ref if ref else None
            if memory:
                entry['memory'] = measure_memory([cfg], frameset, threads, tmp)
            results.append(entry)
        report = {'machine': host, 'threads': threads, 'peak': peak,
                  'frames': {'size': list(size), 'seed': seed, 'distinct': distinct,
                             'timed': frames, 'warmup': warmup},
                  'results': results, 'skipped': skipped}
        int8_ort = [c for c in configs if c.backend == 'onnxruntime' and c.precision == 'int8']
        both = [next((c for c in int8_ort if c.task == t), None) for t in ('lanes', 'flow')]
        if memory and all(both):
            report['memory_both_int8'] = measure_memory(both, frameset, threads, tmp)
    bar.close()
    report['targets'] = _targets(report)
    (out / 'bench.json').write_text(json.dumps(report, indent=1, default=str) + '\n')
    (out / 'bench.md').write_text(markdown(report))
    report['written'] = [str(out / 'bench.json'), str(out / 'bench.md')] + [
        str(p) for p in plots(report, out)]
    return report


def _probe_main(argv):
    if len(argv) != 2 or argv[0] != '--probe':
        print('usage: python -m lane_seg.bench --probe JSON (internal: the memory probe)',
              file=sys.stderr)
        return 2
    print(json.dumps(_probe(json.loads(argv[1]))))
    return 0


if __name__ == '__main__':
    sys.exit(_probe_main(sys.argv[1:]))
