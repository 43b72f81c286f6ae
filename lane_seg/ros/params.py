"""
Parameters of the lane_seg nodes: declared with descriptors, validated, frozen dataclasses.

Each node's parameters are a tuple of :class:`Spec` (name, default, description, range or
choices, read-only when a change needs a restart, and an optional check for arrays).
:class:`NodeParameters` declares them with a ``ParameterDescriptor`` (rclpy itself enforces
the type, the numeric range and read-only), validates every new value in a set-parameters
callback that returns the reason of a refusal, and keeps the accepted values in a frozen
dataclass (``.config``). The same callback runs for values from a parameter file at
declaration, so a bad YAML value fails at start-up with the same reason.
"""

from dataclasses import dataclass, fields, replace
import math
import threading

from lane_seg.process_tuning import parse_cpu_list
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)

BACKENDS = ('auto', 'onnxruntime', 'tensorrt', 'torch')
RELIABILITIES = ('best_effort', 'reliable', 'system_default')


@dataclass(frozen=True)
class Spec:
    """One parameter: default (which fixes its type), description and constraints."""

    name: str
    default: object
    description: str
    bounds: tuple = None         # (low, high), inclusive; ints for integer parameters
    choices: tuple = None        # allowed string values
    read_only: bool = False      # True: needs a restart, set only from the command line/file
    check: object = None         # callable(value) -> None or the reason it is refused
    constraints: str = ''        # extra text for the descriptor

    def descriptor(self) -> ParameterDescriptor:
        desc = ParameterDescriptor(name=self.name, description=self.description,
                                   read_only=self.read_only)
        notes = [self.constraints] if self.constraints else []
        if self.choices:
            notes.append('one of: ' + ', '.join(self.choices))
        if self.bounds is not None:
            low, high = self.bounds
            if isinstance(self.default, bool) or not isinstance(self.default, (int, float)):
                raise TypeError(f'{self.name}: a range needs a numeric default')
            if isinstance(self.default, int):
                desc.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
            else:
                desc.floating_point_range = [
                    FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
        if self.read_only:
            notes.append('read-only: restart the node to change it')
        desc.additional_constraints = '; '.join(notes)
        return desc

    def validate(self, value):
        """Return ``None`` when ``value`` is acceptable, else the reason it is refused."""
        if self.bounds is not None:
            low, high = self.bounds
            if isinstance(value, float) and not math.isfinite(value):
                return f'{value} is not a finite number'
            if not low <= value <= high:
                return f'{value} outside [{low}, {high}]'
        if self.choices is not None and value not in self.choices:
            return f'{value!r} not one of {", ".join(self.choices)}'
        if self.check is not None:
            return self.check(value)
        return None


def _check_roi(value):
    roi = list(value)
    if roi == [0.0] * 4:
        return None
    if len(roi) != 4:
        return f'needs 4 values [top, bottom, left, right], got {len(roi)}'
    if any(not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in roi):
        return f'{roi} has values outside [0, 1]'
    top, bottom, left, right = roi
    if not (top < bottom and left < right):
        return f'{roi} needs top < bottom and left < right'
    return None


def _check_input_size(value):
    size = list(value)
    if len(size) != 2:
        return f'needs 2 values [height, width], got {len(size)}'
    if size == [0, 0]:
        return None
    if any(not 16 <= v <= 4096 for v in size):
        return f"{size}: each side must be in [16, 4096] (or [0, 0] for the model's size)"
    return None


def _check_topic(value):
    if value and (any(c.isspace() for c in value) or value.endswith('/')):
        return f'{value!r} is not a valid topic name'
    return None


RECEIVE_MODES = ('auto', 'worker', 'executor')


def _check_cpus(value):
    try:
        parse_cpu_list(value)
    except ValueError as exc:
        return str(exc)
    return None


def _common(latency_budget_ms):
    return (
        Spec('model_path', '', 'ONNX model (or cached TensorRT engine); empty: the shipped '
             'int8 model', read_only=True),
        Spec('backend', 'auto', 'inference backend', choices=BACKENDS, read_only=True),
        Spec('threads', 2, 'CPU threads of the inference engine', bounds=(1, 64),
             read_only=True),
        Spec('latency_budget_ms', latency_budget_ms, 'diagnostics WARN when the end-to-end '
             'p95 latency exceeds this', bounds=(1.0, 10000.0)),
        Spec('stale_after_s', 2.0, 'diagnostics ERROR when no frame arrives for this long '
             "(receive 'worker': WARN when the worker is busy with one frame this long)",
             bounds=(0.1, 3600.0)),
        Spec('window_s', 10.0, 'rolling window of the latency statistics', bounds=(1.0, 600.0),
             read_only=True),
        Spec('qos_reliability', 'best_effort', 'reliability of the camera subscription '
             '(depth 1)', choices=RELIABILITIES, read_only=True),
        Spec('output_qos_reliability', 'reliable', 'reliability of the outputs (depth 5)',
             choices=RELIABILITIES, read_only=True),
        Spec('worker_nice', 0, 'niceness added to the worker thread (conversion, inference, '
             'publishing; engine threads it starts inherit it), so that the subscription '
             'and middleware threads get a core first when a frame arrives (Linux); 0: same '
             'priority as the node', bounds=(0, 19), read_only=True),
        Spec('receive', 'auto', "how frames reach the worker thread: 'worker' (it waits "
             'on the subscription and takes each frame itself, no hand-off; frames replaced '
             "in the subscription's queue while it works are counted as lost, which needs "
             "the publisher's id in rclpy's message info: Kilted and later), 'executor' (the "
             "subscription's callback hands each frame over; a waiting frame replaced by a "
             "newer one is counted as dropped) or 'auto' (worker where lost frames are "
             'counted, executor elsewhere)', choices=RECEIVE_MODES, read_only=True),
        Spec('cpu_affinity', '', "CPUs the node's process runs on, as taskset -c takes them "
             "(e.g. '0' or '0-1'); '': any. With as few cores as nodes, one core per node "
             'keeps its executor and worker threads together (Linux; a node sharing its '
             'process with others, as in lane-seg run, pins only its worker and engine '
             'threads)', check=_check_cpus, read_only=True),
    )


LANE_SPECS = _common(50.0) + (
    Spec('threshold', 0.0, "lane probability threshold; 0: the model's own (metadata)",
         bounds=(0.0, 1.0), check=lambda v: None if v < 1.0 else 'must be below 1'),
    Spec('roi', [0.0, 0.0, 0.0, 0.0], 'region of interest [top, bottom, left, right] as '
         "fractions of the frame; all zero: the model's own", check=_check_roi),
    Spec('input_size', [0, 0], 'model input size override [height, width]; [0, 0]: the '
         "model's own", check=_check_input_size, read_only=True),
    Spec('publish_overlay', True, 'publish ~/overlay (bgr8 camera image with the lanes)'),
    Spec('gt_topic', '', 'optional ground-truth lane mask (mono8 > 0, or the CARLA '
         'CityScapes palette image) for live IoU; empty: none', check=_check_topic,
         read_only=True),
)

FLOW_SPECS = _common(80.0) + (
    Spec('max_gap_s', 0.5, 'reset the frame pair when consecutive stamps are further apart',
         bounds=(0.001, 60.0), read_only=True),
    Spec('publish_vis', True, 'publish ~/flow_vis (bgr8 Middlebury colours)'),
    Spec('vis_scale', 0.5, 'colour-code the flow at this fraction of the camera resolution '
         '(then resize), which makes ~/flow_vis 1/scale^2 times cheaper', bounds=(0.1, 1.0)),
    Spec('vis_max_flow', 0.0, 'flow magnitude (pixels) of full saturation in ~/flow_vis; 0: '
         'the largest in each frame', bounds=(0.0, 10000.0)),
    Spec('gt_topic', '', 'optional ground-truth flow for live EPE (32FC2, flow K -> K+1 '
         'stamped with frame K+1 like ~/flow, NaN where invalid); empty: none',
         check=_check_topic, read_only=True),
)

CAMERA_SIM_SPECS = (
    Spec('rate_hz', 20.0, 'publishing rate (the CARLA bridge default is 20 Hz)',
         bounds=(0.1, 240.0), read_only=True),
    Spec('width', 800, 'image width (CARLA default 800)', bounds=(16, 4096), read_only=True),
    Spec('height', 600, 'image height (CARLA default 600)', bounds=(16, 4096),
         read_only=True),
    Spec('seed', 0, 'synthetic drive seed', bounds=(0, 2 ** 31 - 1), read_only=True),
    Spec('fov_deg', 90.0, 'horizontal field of view', bounds=(10.0, 170.0), read_only=True),
    Spec('camera_topic', '/carla/ego_vehicle/rgb_front', 'publishes <camera_topic>/image and '
         '<camera_topic>/camera_info', check=_check_topic, read_only=True),
    Spec('frame_id', 'ego_vehicle/rgb_front', 'header frame_id of everything published',
         read_only=True),
    Spec('loop_frames', 0, 'render this many frames once, then replay them in a loop; 0: '
         'render without end', bounds=(0, 100000), read_only=True),
    Spec('publish_ground_truth', True, 'publish ~/lane_mask and ~/flow'),
)


@dataclass(frozen=True)
class _Config:

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class LaneSegParams(_Config):
    """Parameters of ``lane_seg_node``."""

    model_path: str
    backend: str
    threads: int
    latency_budget_ms: float
    stale_after_s: float
    window_s: float
    qos_reliability: str
    output_qos_reliability: str
    worker_nice: int
    receive: str
    cpu_affinity: str
    threshold: float
    roi: tuple
    input_size: tuple
    publish_overlay: bool
    gt_topic: str

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of ``LanePipeline.from_model`` (``None`` = the model's own)."""
        roi = None
        if any(self.roi):
            top, bottom, left, right = self.roi
            roi = {'top': top, 'bottom': bottom, 'left': left, 'right': right}
        return {'model_path': self.model_path or None, 'backend': self.backend,
                'threads': self.threads, 'threshold': self.threshold or None, 'roi': roi,
                'input_size': tuple(self.input_size) if any(self.input_size) else None}


@dataclass(frozen=True)
class FlowParams(_Config):
    """Parameters of ``flow_node``."""

    model_path: str
    backend: str
    threads: int
    latency_budget_ms: float
    stale_after_s: float
    window_s: float
    qos_reliability: str
    output_qos_reliability: str
    worker_nice: int
    receive: str
    cpu_affinity: str
    max_gap_s: float
    publish_vis: bool
    vis_scale: float
    vis_max_flow: float
    gt_topic: str

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of ``FlowPipeline.from_model``."""
        return {'model_path': self.model_path or None, 'backend': self.backend,
                'threads': self.threads, 'max_gap_s': self.max_gap_s}


@dataclass(frozen=True)
class CameraSimParams(_Config):
    """Parameters of ``camera_sim_node``."""

    rate_hz: float
    width: int
    height: int
    seed: int
    fov_deg: float
    camera_topic: str
    frame_id: str
    loop_frames: int
    publish_ground_truth: bool


def _plain(value):
    """Parameter values as plain Python (arrays become tuples)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    return tuple(value.tolist() if hasattr(value, 'tolist') else value)


class NodeParameters:
    """
    Declare ``specs`` on ``node``, validate changes, keep them in a frozen ``config_cls``.

    ``on_change(old, new)`` runs (in the parameter service's thread) after a change is
    accepted. Only this class's callback validates the node's parameters, so a change it
    accepts is applied by rclpy right after (``add_post_set_parameters_callback`` would be
    cleaner but does not exist on Humble).
    """

    def __init__(self, node, specs, config_cls, on_change=None):
        self.specs = {spec.name: spec for spec in specs}
        missing = set(config_cls.names()) ^ set(self.specs)
        if missing:
            raise TypeError(f'{config_cls.__name__} and its specs differ in {sorted(missing)}')
        self._lock = threading.Lock()
        self._on_change = on_change
        self._declaring = True
        node.add_on_set_parameters_callback(self._on_set)
        values = {}
        for spec in specs:
            param = node.declare_parameter(spec.name, spec.default, spec.descriptor())
            values[spec.name] = _plain(param.value)
        self.config = config_cls(**values)
        self._declaring = False

    def _on_set(self, parameters):
        changes = {}
        for param in parameters:
            spec = self.specs.get(param.name)
            if spec is None:
                continue
            value = _plain(param.value)
            reason = spec.validate(value)
            if reason is not None:
                return SetParametersResult(successful=False,
                                           reason=f'{param.name}: {reason}')
            changes[param.name] = value
        if changes and not self._declaring:
            with self._lock:
                old = self.config
                self.config = replace(old, **changes)
                new = self.config
            if self._on_change is not None:
                self._on_change(old, new)
        return SetParametersResult(successful=True)
