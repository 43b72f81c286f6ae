"""
``flow_node``: dense optical flow between consecutive camera frames.

Subscribes ``image`` (sensor-data QoS, depth 1); publishes ``~/flow`` and ``~/flow_vis``
(``bgr8`` Middlebury colours, only while someone subscribes and ``publish_vis`` is on).

``~/flow`` follows lane_seg's flow convention, which every ground-truth flow topic shares
(``camera_sim_node``'s and ``carla_camera_node``'s ``~/flow``, ``/lane_seg/gt/flow`` of
``lane-seg bag make``): the forward flow from the previous frame K to the current frame K+1
on frame K's pixel grid (pixel ``(u, v)`` of K moves to ``(u + du, v + dv)`` in K+1), ``32FC2``
pixels per frame at the camera's resolution, stamped with frame K+1's header (the newer
frame, the one it is published with); ground truth is NaN where invalid.

The pipeline resets its frame pair when stamps jump backwards, when the gap exceeds
``max_gap_s``, or when the resolution or encoding changes; each reset is logged and counted
in ``/diagnostics`` (``events.reset.<kind>``). With ``gt_topic`` set (ground truth in that
convention) the live end-point error of each pair of consecutively received frames is
reported, matching the flow and the ground truth by their (newer frame's) stamp.
"""

import re
import time

import cv2
from lane_seg import metrics
from lane_seg.flow.viz import flow_to_color
from lane_seg.image_conversion import image_to_numpy, ImageConversionError
import numpy as np
from sensor_msgs.msg import Image

from .base import PerceptionNode, publish_image, spin_node, stamp_ns, StampMatcher
from .params import FLOW_SPECS, FlowParams
from .qos import input_qos


def default_flow_factory(**kwargs):
    """``FlowPipeline.from_model`` (imported when the node loads its model)."""
    from lane_seg.pipeline.flow import FlowPipeline
    return FlowPipeline.from_model(**kwargs)


def reset_kind(reason: str) -> str:
    """'gap 0.8 s > max_gap_s' -> 'gap'; 'time jumped back 1.2 s' -> 'time_jumped_back'."""
    words = re.split(r'[\d.]', reason or 'unknown', maxsplit=1)[0].strip()
    return re.sub(r'\W+', '_', words).strip('_').lower() or 'unknown'


def flow_vis(flow: np.ndarray, scale: float = 1.0, max_flow=None) -> np.ndarray:
    """Middlebury colours of ``flow``, computed at ``scale`` of its size and resized back."""
    h, w = flow.shape[:2]
    if scale < 1.0:
        small = cv2.resize(flow, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(flow_to_color(small, max_flow=max_flow), (w, h),
                          interpolation=cv2.INTER_LINEAR)
    return flow_to_color(flow, max_flow=max_flow)


def epe(pred: np.ndarray, gt: np.ndarray):
    """End-point error (``lane_seg.metrics``) over finite ground truth; ``None`` if none."""
    if pred.shape != gt.shape:
        return None
    value = metrics.epe(pred, gt)
    return value if np.isfinite(value) else None


class FlowNode(PerceptionNode):
    """Optical-flow node; ``pipeline_factory(**kwargs)`` builds the pipeline."""

    NODE_NAME = 'flow_node'
    SPECS = FLOW_SPECS
    CONFIG = FlowParams
    TASK = 'flow'

    def __init__(self, pipeline_factory=None, node_name=NODE_NAME, **node_kwargs):
        self._prev = None   # (stamp_ns, receive seq) of the frame the pipeline holds
        super().__init__(node_name, pipeline_factory or default_flow_factory, **node_kwargs)

    def create_outputs(self, cfg: FlowParams):
        self.pub_flow = self.create_publisher(Image, '~/flow', self.out_qos)
        self.pub_vis = self.create_publisher(Image, '~/flow_vis', self.out_qos)
        self.gt = None
        if cfg.gt_topic:
            self.gt = StampMatcher(epe)
            self.sub_gt = self.create_subscription(Image, cfg.gt_topic, self._on_gt,
                                                   input_qos('best_effort', depth=5))

    def load_pipeline(self, cfg: FlowParams):
        return self._factory(logger=self.get_logger(), **cfg.pipeline_kwargs())

    def _on_gt(self, msg):
        try:
            if msg.encoding != '32FC2':
                raise ImageConversionError(f'ground-truth flow must be 32FC2, not '
                                           f'{msg.encoding}')
            flow = image_to_numpy(msg)
        except ImageConversionError as exc:
            self.throttled('gt', f'ignoring ground truth on {self.sub_gt.topic_name}: {exc}')
            return
        self._score(self.gt.add_ground_truth(stamp_ns(msg.header), flow))

    def _score(self, value):
        if value is not None:
            with self._lock:
                self.stats.metric('epe', value)

    def process(self, msg, image, seq, conversion_ms):
        stamp = stamp_ns(msg.header)
        result = self.pipeline(image, msg.encoding, stamp / 1e9)
        prev, self._prev = self._prev, (stamp, seq)
        if result is None:
            reason = getattr(self.pipeline, 'last_reset', None) or 'first frame'
            kind = reset_kind(reason)
            level = 'info' if kind == 'first_frame' else 'warning'
            self.event(f'reset.{kind}', f'flow pair reset: {reason}; the next frame starts '
                       f'a new pair', level)
            return None
        t0 = time.perf_counter()
        cfg = self.params.config
        publish_image(self.pub_flow, result.flow, '32FC2', msg.header)
        if cfg.publish_vis and self.pub_vis.get_subscription_count() > 0:
            vis = flow_vis(result.flow, cfg.vis_scale, cfg.vis_max_flow or None)
            publish_image(self.pub_vis, vis, 'bgr8', msg.header)
        stages = {'conversion': conversion_ms}
        stages.update(result.timings)
        stages['publish'] = (time.perf_counter() - t0) * 1e3
        if self.gt is not None and prev is not None and prev[1] == seq - 1:
            # Consecutive frames (none dropped in between): the flow K -> K+1 and its ground
            # truth are both stamped with frame K+1.
            self._score(self.gt.add_prediction(stamp, result.flow))
        return stages


def main(args=None):
    return spin_node(FlowNode, args, own_process=True)


if __name__ == '__main__':
    raise SystemExit(main())
