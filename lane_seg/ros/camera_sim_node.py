"""
``camera_sim_node``: the synthetic drive on the CARLA bridge's camera topics, with ground truth.

The synthetic drive is published the way the CARLA ROS bridge publishes its front RGB camera,
plus exact ground truth.

Publishes ``<camera_topic>/image`` (``bgra8``, default ``/carla/ego_vehicle/rgb_front/image``,
800x600, frame_id ``ego_vehicle/rgb_front``, reliable depth 10 like the bridge) and
``<camera_topic>/camera_info`` at ``rate_hz`` (20 Hz), and with ``publish_ground_truth`` the
lane boundaries on ``~/lane_mask`` (``mono8``, 255 on lanes) and the optical flow on
``~/flow``, all with the same header, stamped from the node clock (so ``use_sim_time`` works).

``~/flow`` follows lane_seg's flow convention, the same as ``flow_node``'s output: published
with frame K+1 and stamped with its header, it holds the forward flow from the previous frame
K to frame K+1 on frame K's pixel grid (pixel ``(u, v)`` of K moves to ``(u + du, v + dv)`` in
K+1), ``32FC2`` pixels per frame, NaN where the point is occluded or leaves the view. The
first frame has no flow message.

Rendering runs in a background thread, one frame ahead; the drive advances one frame per
published frame (``1 / rate_hz`` of world time). When rendering is slower than ``rate_hz``
(800x600 renders at about 3 frames/s on 2 cores) a frame is published as soon as it is
ready, and the slowdown is logged once; ``loop_frames`` renders a short drive once and then
replays it at the full rate (the pair across the loop's seam has no flow ground truth: the
first frame of each pass comes without flow).
"""

import queue
import threading
import time

import cv2
from lane_seg.sim import CameraConfig, DriveConfig, SyntheticDrive
import numpy as np
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from .base import publish_image, spin_node
from .params import CAMERA_SIM_SPECS, CameraSimParams, NodeParameters
from .qos import output_qos

BRIDGE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


def camera_info(intrinsics, frame_id: str = '') -> CameraInfo:
    """Pinhole ``CameraInfo`` without distortion (as the CARLA bridge fills it)."""
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(intrinsics.width), int(intrinsics.height)
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    msg.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def frame_images(frame, previous=None) -> dict:
    """
    Return the image, lane mask and flow of a ``lane_seg.sim.Frame`` as (array, encoding).

    ``previous`` is the frame just before ``frame``: the flow, published with ``frame``, is
    ``previous.flow`` (from ``previous`` to ``frame``, on ``previous``'s grid, NaN where
    invalid); ``None`` without a previous frame. The node serializes them when it publishes
    (:func:`lane_seg.image_cdr.encode_image`: one copy of the pixels, stamped then).
    """
    out = {'image': (cv2.cvtColor(frame.image, cv2.COLOR_BGR2BGRA), 'bgra8'),
           'lane_mask': (np.where(frame.lane_mask > 0, 255, 0).astype(np.uint8), 'mono8'),
           'flow': None}
    if previous is not None:
        flow = np.where(previous.flow_valid[..., None], previous.flow, np.nan)
        out['flow'] = (flow.astype(np.float32), '32FC2')
    return out


class CameraSimNode(Node):
    """Publishes the synthetic drive; see the module docstring."""

    NODE_NAME = 'camera_sim_node'

    def __init__(self, node_name=NODE_NAME, **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self.params = NodeParameters(self, CAMERA_SIM_SPECS, CameraSimParams)
        cfg = self.params.config
        camera = CameraConfig(width=cfg.width, height=cfg.height, fov_deg=cfg.fov_deg)
        self.drive = SyntheticDrive(DriveConfig(seed=cfg.seed, camera=camera,
                                                fps=min(max(cfg.rate_hz, 1.0), 240.0)))
        base = cfg.camera_topic.rstrip('/')
        self.pub_image = self.create_publisher(Image, f'{base}/image', BRIDGE_QOS)
        self.pub_info = self.create_publisher(CameraInfo, f'{base}/camera_info', BRIDGE_QOS)
        out = output_qos()
        self.pub_lanes = self.create_publisher(Image, '~/lane_mask', out)
        self.pub_flow = self.create_publisher(Image, '~/flow', out)
        self.info = camera_info(self.drive.intrinsics, cfg.frame_id)
        self.published = 0
        self.skipped_ticks = 0
        self._queue = queue.Queue(maxsize=2)
        self._cache = []
        self._loop_index = 0
        self._stop = threading.Event()
        self._render_fps = None
        self._warned_slow = False
        self._renderer = threading.Thread(target=self._render, name='camera_sim_render',
                                          daemon=True)
        self._renderer.start()
        self.timer = self.create_timer(1.0 / cfg.rate_hz, self._tick)
        self.get_logger().info(
            f'synthetic drive seed {cfg.seed} ({self.drive.weather.name}, '
            f'{self.drive.road.lanes} lanes), {cfg.width}x{cfg.height} bgra8 at '
            f'{cfg.rate_hz:g} Hz on {self.pub_image.topic_name}, frame_id {cfg.frame_id}'
            + (f', {cfg.loop_frames} frames looped' if cfg.loop_frames else ''))

    def _render(self):
        cfg = self.params.config
        count = cfg.loop_frames or None
        t0 = time.monotonic()
        rendered = 0
        previous = None
        for frame in self.drive.frames(count if count else 10 ** 12):
            if self._stop.is_set():
                return
            # The flow K -> K+1 goes out with frame K+1; frame 0 (and so each pass of a
            # loop) has none.
            msgs = frame_images(frame, previous)
            previous = frame
            rendered += 1
            self._render_fps = rendered / max(time.monotonic() - t0, 1e-6)
            while not self._stop.is_set():
                try:
                    self._queue.put(msgs, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if count is not None:
                self._cache.append(msgs)

    def _next(self):
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        cfg = self.params.config
        if cfg.loop_frames and len(self._cache) == cfg.loop_frames:
            msgs = self._cache[self._loop_index % len(self._cache)]
            self._loop_index += 1
            return msgs
        return None

    def _tick(self):
        msgs = self._next()
        cfg = self.params.config
        if msgs is None:
            self.skipped_ticks += 1
            if (not self._warned_slow and self._render_fps is not None
                    and self._render_fps < 0.9 * cfg.rate_hz):
                self._warned_slow = True
                hint = (f'the {cfg.loop_frames} looped frames replay at full rate once '
                        'rendered' if cfg.loop_frames else
                        'set loop_frames to replay a pre-rendered drive at full rate')
                self.get_logger().warning(
                    f'rendering {self._render_fps:.1f} frames/s at {cfg.width}x{cfg.height} '
                    f'is slower than rate_hz {cfg.rate_hz:g}: publishing each frame when it '
                    f'is ready ({hint})')
            return
        header = self.info.header
        header.stamp = self.get_clock().now().to_msg()
        header.frame_id = cfg.frame_id
        publish_image(self.pub_image, *msgs['image'], header)
        self.pub_info.publish(self.info)
        if cfg.publish_ground_truth:
            publish_image(self.pub_lanes, *msgs['lane_mask'], header)
            if msgs['flow'] is not None:
                publish_image(self.pub_flow, *msgs['flow'], header)
        self.published += 1

    def close(self):
        renderer = getattr(self, '_renderer', None)
        if renderer is None:
            return
        self._stop.set()
        if renderer.is_alive():
            renderer.join(5.0)

    def destroy_node(self):
        self.close()
        return super().destroy_node()


def main(args=None):
    return spin_node(CameraSimNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
