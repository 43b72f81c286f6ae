"""
``lane_seg_node``: lane boundaries from a camera topic.

Subscribes ``image`` (sensor-data QoS, depth 1: newest frame wins, dropped frames counted)
and ``camera_info``; publishes ``~/mask`` (``mono8`` 0/255 at the camera's resolution, the
input header), ``~/overlay`` (``bgr8`` camera image with the lanes, only while someone
subscribes and ``publish_overlay`` is on) and ``~/camera_info`` (the latest camera info with
the mask's header). With ``gt_topic`` set it reports the live IoU against the ground truth
with the same stamp. Diagnostics on ``/diagnostics`` at 1 Hz.

Frames are rejected, counted by reason and logged (throttled) when they are malformed, of
an unsupported encoding, hold NaN/inf (float images), or are older than the previous frame
(several in a row are taken as a clock reset, e.g. a bag replayed from its start).
A resolution change is served and counted as an event.
"""

import threading
import time

from lane_seg.carla.conversions import palette_to_lane_mask
from lane_seg.image_conversion import image_to_numpy, ImageConversionError
from lane_seg.metrics import lane_iou
from lane_seg.pipeline.preprocess import to_bgr
import numpy as np
from sensor_msgs.msg import CameraInfo, Image

from .base import PerceptionNode, publish_image, ros_header, spin_node, stamp_ns, StampMatcher
from .params import LANE_SPECS, LaneSegParams
from .qos import input_qos

OVERLAY_BGR = np.array([0, 255, 0], np.float32)
CLOCK_RESET_FRAMES = 3   # this many consecutive older frames: the clock was reset


def default_lane_factory(**kwargs):
    """``LanePipeline.from_model`` (imported when the node loads its model)."""
    from lane_seg.pipeline.lanes import LanePipeline
    return LanePipeline.from_model(**kwargs)


def gt_lane_mask(msg) -> np.ndarray:
    """Ground-truth lanes from ``mono8`` (> 0) or CARLA's CityScapes palette image."""
    image = image_to_numpy(msg)
    if msg.encoding in ('mono8', 'mono16'):
        return image > 0
    if msg.encoding in ('bgr8', 'bgra8', 'rgb8', 'rgba8'):
        order = 'bgr' if msg.encoding.startswith('bgr') else 'rgb'
        return palette_to_lane_mask(image, channel_order=order) > 0
    raise ImageConversionError(f'ground truth in {msg.encoding} is not supported')


def iou(pred: np.ndarray, gt: np.ndarray):
    """Lane IoU of two masks (``lane_seg.metrics``); ``None`` when the sizes differ."""
    if pred.shape != gt.shape:
        return None
    return lane_iou(pred, gt)


def overlay(image_bgr: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Draw the lane mask over the camera image in green."""
    out = image_bgr.copy()
    on = mask > 0
    out[on] = (image_bgr[on] * (1 - alpha) + OVERLAY_BGR * alpha).astype(np.uint8)
    return out


class LaneSegNode(PerceptionNode):
    """Lane segmentation node; ``pipeline_factory(**kwargs)`` builds the pipeline."""

    NODE_NAME = 'lane_seg_node'
    SPECS = LANE_SPECS
    CONFIG = LaneSegParams
    TASK = 'lanes'

    def __init__(self, pipeline_factory=None, node_name=NODE_NAME, **node_kwargs):
        self._camera_info = None
        self._last_stamp = None
        self._older_in_row = 0
        self._last_shape = None
        self._rebuild = threading.Event()
        super().__init__(node_name, pipeline_factory or default_lane_factory, **node_kwargs)

    def create_outputs(self, cfg: LaneSegParams):
        self.pub_mask = self.create_publisher(Image, '~/mask', self.out_qos)
        self.pub_overlay = self.create_publisher(Image, '~/overlay', self.out_qos)
        self.pub_info = self.create_publisher(CameraInfo, '~/camera_info', self.out_qos)
        self.sub_info = self.create_subscription(
            CameraInfo, 'camera_info', self._on_camera_info, input_qos(cfg.qos_reliability))
        self.gt = None
        if cfg.gt_topic:
            self.gt = StampMatcher(iou)
            self.sub_gt = self.create_subscription(Image, cfg.gt_topic, self._on_gt,
                                                   input_qos('best_effort', depth=5))

    def load_pipeline(self, cfg: LaneSegParams):
        return self._factory(logger=self.get_logger(), **cfg.pipeline_kwargs())

    def params_changed(self, old, new):
        if (old.threshold, old.roi) != (new.threshold, new.roi):
            self._rebuild.set()

    # -- callbacks -----------------------------------------------------------------------
    def _on_camera_info(self, msg):
        self._camera_info = msg

    def _on_gt(self, msg):
        try:
            mask = gt_lane_mask(msg)
        except ImageConversionError as exc:
            self.throttled('gt', f'ignoring ground truth on {self.sub_gt.topic_name}: {exc}')
            return
        self._score(self.gt.add_ground_truth(stamp_ns(msg.header), mask))

    def _score(self, value):
        if value is not None:
            with self._lock:
                self.stats.metric('iou', value)

    # -- per frame -----------------------------------------------------------------------
    def _check_stamp(self, msg) -> bool:
        stamp = stamp_ns(msg.header)
        last = self._last_stamp
        if last is not None and stamp <= last:
            self._older_in_row += 1
            if self._older_in_row < CLOCK_RESET_FRAMES:
                what = 'repeats' if stamp == last else (
                    f'is {(last - stamp) / 1e9:.3f} s older than')
                self.reject('stamp_backwards',
                            f"stamp {stamp / 1e9:.3f} s {what} the previous frame's "
                            f'{last / 1e9:.3f} s', msg)
                return False
            self.event('clock_reset', f'{CLOCK_RESET_FRAMES} frames in a row older than '
                       f'{last / 1e9:.3f} s: taking it as a clock reset, serving from '
                       f'{stamp / 1e9:.3f} s', 'warning')
        self._older_in_row = 0
        self._last_stamp = stamp
        return True

    def process(self, msg, image, seq, conversion_ms):
        if not self._check_stamp(msg):
            return None
        if self._rebuild.is_set():
            self._rebuild.clear()
            self.rebuild_pipeline()
        shape = image.shape[:2]
        if self._last_shape is not None and shape != self._last_shape:
            self.event('resolution_change',
                       f'resolution changed {self._last_shape[0]}x{self._last_shape[1]} -> '
                       f'{shape[0]}x{shape[1]}; serving at the new size', 'warning')
        self._last_shape = shape
        result = self.pipeline(image, msg.encoding)
        t0 = time.perf_counter()
        cfg = self.params.config
        publish_image(self.pub_mask, result.mask, 'mono8', msg.header)
        if cfg.publish_overlay and self.pub_overlay.get_subscription_count() > 0:
            bgr = to_bgr(image, msg.encoding)
            publish_image(self.pub_overlay, overlay(bgr, result.mask), 'bgr8', msg.header)
        info = self._camera_info
        if info is not None:
            info.header = ros_header(msg.header)
            self.pub_info.publish(info)
        stages = {'conversion': conversion_ms}
        stages.update(result.timings)
        stages['publish'] = (time.perf_counter() - t0) * 1e3
        if self.gt is not None:
            self._score(self.gt.add_prediction(stamp_ns(msg.header), result.mask > 0))
        return stages


def main(args=None):
    return spin_node(LaneSegNode, args, own_process=True)


if __name__ == '__main__':
    raise SystemExit(main())
