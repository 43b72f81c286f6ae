"""
One-process runner: the synthetic camera and both perception nodes in one executor.

``camera_sim_node``, ``lane_seg_node`` and ``flow_node`` share one ``MultiThreadedExecutor``,
for machines without ``ros2 launch``.

``lane-seg run --params config/sim.yaml [--duration S] [--out DIR]`` reads the same ROS
parameter file as ``sim.launch.py`` (``node_name: {ros__parameters: {...}}``), wires the
nodes' ``image``/``camera_info`` to the camera topic as the launch file does, runs for
``--duration`` seconds, then writes ``overlay_NN.png``, ``flow_NN.png`` and ``summary.json``
(per node: end-to-end and per-stage latency percentiles, rates, drops, rejections, live
IoU/EPE, start-up failures) to ``--out``.
"""

import json
import math
from pathlib import Path
import sys
import time

import cv2
from lane_seg.image_conversion import image_to_numpy
from lane_seg.process_tuning import tune_process
import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image
import yaml

from .camera_sim_node import CameraSimNode
from .flow_node import FlowNode
from .lane_seg_node import LaneSegNode
from .qos import output_qos

DEFAULT_CAMERA_TOPIC = '/carla/ego_vehicle/rgb_front'


def camera_topic_from_params(path) -> str:
    """Return the camera topic ``camera_sim_node`` publishes under, per the parameter file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for name in ('camera_sim_node', '/camera_sim_node', '/**'):
        params = (data.get(name) or {}).get('ros__parameters') or {}
        if 'camera_topic' in params:
            return str(params['camera_topic']).rstrip('/')
    return DEFAULT_CAMERA_TOPIC


def _clean(value):
    """JSON-safe: NaN/inf become ``None``, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def node_summary(stats_summary: dict) -> dict:
    """Return the compact, printable part of ``LatencyStats.summary()``."""
    s = stats_summary
    pick = ('p50', 'p95', 'p99', 'max')
    return _clean({
        'model': s['info'],
        'startup_failure': s['startup_failure'],
        'frames': {k: s[k] for k in ('received', 'processed', 'dropped')},
        'rejected': s['rejected'],
        'events': s['events'],
        'input_rate_hz': round(s['input_rate_hz'], 2),
        'output_rate_hz': round(s['output_rate_hz'], 2),
        'end_to_end_ms': {k: round(s['end_to_end_ms'][k], 2) for k in pick},
        'stages_ms': {name: {k: round(v[k], 2) for k in ('p50', 'p95', 'max')}
                      for name, v in s['stages_ms'].items()},
        'metrics': {k: round(v, 4) for k, v in s['metrics'].items()},
    })


class Recorder(Node):
    """
    Saves a few overlay and flow pictures, spread over the run.

    The first picture of a topic is its first message; each next one is due after an equal share
    of the time left for the pictures still to take, so a topic that starts late (a model still
    loading, the flow's first frame pair) still gets all of its pictures within the run.
    """

    def __init__(self, out: Path, topics: dict, pictures: int, duration: float, **kwargs):
        super().__init__('lane_seg_runner', **kwargs)
        self.out = out
        self.duration = duration
        self.pictures = pictures
        self.saved = {name: [] for name in topics}
        self._next_at = dict.fromkeys(topics, 0.0)
        self.t0 = time.monotonic()
        for name, topic in topics.items():
            self.create_subscription(Image, topic, lambda msg, n=name: self._save(n, msg),
                                     output_qos())

    def _save(self, name, msg):
        now = time.monotonic() - self.t0
        if len(self.saved[name]) >= self.pictures or now < self._next_at[name]:
            return
        to_take = self.pictures - len(self.saved[name])   # this one included
        self._next_at[name] = now + max(self.duration - now, 0.0) / to_take
        path = self.out / f'{name}_{len(self.saved[name]):02d}.png'
        cv2.imwrite(str(path), image_to_numpy(msg))
        self.saved[name].append(path.name)


def resolve_params(path) -> Path:
    """``path`` as given, else relative to the source checkout or the installed share folder."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    candidates = [Path(__file__).resolve().parents[2] / path]
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory('lane_seg')) / path)
    except Exception:  # not in an ament workspace: only the checkout
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return path


def run(params, duration: float = 5.0, out='out/run', pictures: int = 4,
        lane_factory=None, flow_factory=None, threads: int = 4,
        startup_timeout_s: float = 60.0) -> dict:
    """Run the pipeline for ``duration`` seconds; return (and write) the summary."""
    params = resolve_params(params)
    if not params.is_file():
        raise FileNotFoundError(f'parameter file {params} not found')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    camera = camera_topic_from_params(params)
    remap = ['--ros-args', '-r', f'image:={camera}/image',
             '-r', f'camera_info:={camera}/camera_info']
    # run() is a library call: the switch interval and OpenCV's threads are put back at the
    # end; the malloc setting stays (it cannot be undone, and it only keeps memory mapped)
    switch_interval, opencv_threads = sys.getswitchinterval(), cv2.getNumThreads()
    tune_process(warn=rclpy.logging.get_logger('lane_seg_run').warning)
    context = Context()
    rclpy.init(args=['--ros-args', '--params-file', str(params)], context=context)
    nodes = []
    executor = None
    try:
        sim = CameraSimNode(context=context)
        nodes.append(sim)
        lanes = LaneSegNode(lane_factory, context=context, cli_args=remap)
        nodes.append(lanes)
        flow = FlowNode(flow_factory, context=context, cli_args=remap)
        nodes.append(flow)
        recorder = Recorder(out, {'overlay': lanes.pub_overlay.topic_name,
                                  'flow': flow.pub_vis.topic_name},
                            pictures, duration, context=context)
        nodes.append(recorder)
        executor = MultiThreadedExecutor(num_threads=threads, context=context)
        for node in nodes:
            executor.add_node(node)
        # The duration starts with the first camera frame (models loaded, first frame drawn).
        t0 = time.monotonic()
        while sim.published == 0 and time.monotonic() - t0 < startup_timeout_s:
            executor.spin_once(timeout_sec=0.1)
        t0 = time.monotonic()
        recorder.t0 = t0
        while time.monotonic() - t0 < duration and context.ok():
            executor.spin_once(timeout_sec=0.1)
        elapsed = time.monotonic() - t0
        summary = {
            'params': str(params),
            'duration_s': round(elapsed, 2),
            'camera': {'topic': sim.pub_image.topic_name, 'published': sim.published,
                       'size': [sim.params.config.height, sim.params.config.width],
                       'rate_hz': sim.params.config.rate_hz},
            'lane_seg_node': node_summary(lanes.summary()),
            'flow_node': node_summary(flow.summary()),
            'pictures': recorder.saved,
        }
    finally:
        if executor is not None:
            for node in nodes:
                executor.remove_node(node)
            # Let callbacks already handed to the thread pool finish: shutdown() destroys the
            # executor's guard condition, which they trigger when they end.
            time.sleep(0.3)
            executor.shutdown(timeout_sec=2.0)
        for node in reversed(nodes):
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        sys.setswitchinterval(switch_interval)
        cv2.setNumThreads(opencv_threads)
    summary['outputs'] = sorted({p.name for p in out.iterdir()} | {'summary.json'})
    (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    return summary
