"""
``carla_camera_node``: CARLA cameras to ROS 2 without the CARLA ROS bridge.

Connects to a CARLA server (0.9.13 to 0.9.16 Python API) through the optional ``carla``
package, attaches to the vehicle whose ``role_name`` matches (or spawns one), mounts an RGB
camera, a semantic-segmentation camera and, where the server has it, an optical-flow camera,
and publishes like the bridge does:

* ``/carla/<role>/<camera>/image`` (``bgra8``) and ``.../camera_info``, frame_id
  ``<role>/<camera>``, reliable QoS depth 10, stamped with CARLA's simulation time
  (``/clock`` is published too, so run the other nodes with ``use_sim_time:=true``);
* ``~/lane_mask`` (``mono8``, 255 on road lines, tag chosen from the server version);
* ``~/flow`` (``32FC2``, pixels): lane_seg's flow convention, like ``flow_node``'s output and
  every other ground-truth flow topic: published with frame K+1 and stamped with its header,
  the forward flow from the previous frame K to K+1 on frame K's grid, NaN where the point
  leaves the view (see :mod:`lane_seg.carla.conversions`; ``flow_convention:=backward``
  gives CARLA's exact backward field instead, with the same stamp).

No server reachable: an ERROR naming host, port and timeout after ``timeout_s`` and a non-zero
exit code, never a hang. The image-to-message functions here take any object with ``width``,
``height``, ``raw_data``, ``frame`` and ``timestamp``, so they are tested without a server.
"""

from collections import namedtuple
from dataclasses import dataclass
import math
import sys

from builtin_interfaces.msg import Time
import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
import rclpy
from rclpy.clock import Clock as RosClock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from .conversions import (carla_flow_to_pixels, flow_convention, road_line_tag,
                          semantic_raw_to_lane_mask, server_supports_optical_flow)
from ..image_conversion import numpy_to_image
from ..process_tuning import tune_process

NODE_NAME = 'carla_camera_node'
INSTALL_HINT = ('pip install carla==<server version> (the client must match the CARLA '
                'server, e.g. carla==0.9.16)')


_PreviousFlow = namedtuple('_PreviousFlow', 'frame')


class CarlaClientError(RuntimeError):
    """The CARLA client cannot start; the text says why and what to do."""


@dataclass(frozen=True)
class CarlaCameraConfig:
    """The node's parameters, validated; fields match the ROS parameter names."""

    host: str = 'localhost'
    port: int = 2000
    timeout_s: float = 2.0
    role_name: str = 'ego_vehicle'
    spawn: bool = False
    vehicle_filter: str = 'vehicle.audi.tt'
    autopilot: bool = True
    tm_port: int = 8000
    camera_name: str = 'rgb_front'
    camera_pose: tuple = (2.0, 0.0, 2.0, 0.0, 0.0, 0.0)
    width: int = 800
    height: int = 600
    fov: float = 90.0
    rate_hz: float = 20.0
    synchronous_mode: bool = True
    publish_flow: bool = True
    flow_convention: str = 'forward'
    publish_clock: bool = True

    def __post_init__(self):
        problems = []
        if not self.host:
            problems.append('host is empty')
        for name in ('port', 'tm_port'):
            if not 1 <= getattr(self, name) <= 65535:
                problems.append(f'{name}={getattr(self, name)} is not in [1, 65535]')
        if not 0 < self.timeout_s <= 600:
            problems.append(f'timeout_s={self.timeout_s} is not in (0, 600]')
        for name in ('role_name', 'camera_name', 'vehicle_filter'):
            if not getattr(self, name):
                problems.append(f'{name} is empty')
        if len(self.camera_pose) != 6:
            problems.append('camera_pose needs 6 values: x, y, z, roll, pitch, yaw')
        for name in ('width', 'height'):
            if not 1 <= getattr(self, name) <= 8192:
                problems.append(f'{name}={getattr(self, name)} is not in [1, 8192]')
        if not 0 < self.fov < 180:
            problems.append(f'fov={self.fov} is not in (0, 180)')
        if not 0 < self.rate_hz <= 1000:
            problems.append(f'rate_hz={self.rate_hz} is not in (0, 1000]')
        try:
            flow_convention(self.flow_convention)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError('invalid parameters: ' + '; '.join(problems))

    @property
    def frame_id(self):
        return f'{self.role_name}/{self.camera_name}'

    @property
    def image_topic(self):
        return f'/carla/{self.role_name}/{self.camera_name}/image'

    @property
    def camera_info_topic(self):
        return f'/carla/{self.role_name}/{self.camera_name}/camera_info'


_DESCRIPTIONS = {
    'host': 'CARLA server host',
    'port': 'CARLA server RPC port',
    'timeout_s': 'seconds to wait for the server (connection and each synchronous tick)',
    'role_name': 'role_name attribute of the ego vehicle to attach to (or to spawn)',
    'spawn': 'spawn the ego vehicle when none has role_name',
    'vehicle_filter': 'blueprint filter of the vehicle to spawn',
    'autopilot': 'put a spawned vehicle on the traffic manager autopilot',
    'tm_port': 'traffic manager port',
    'camera_name': 'sensor id in topic names and frame_id, as the bridge names it',
    'camera_pose': 'camera mount on the vehicle: x, y, z (m), roll, pitch, yaw (deg)',
    'width': 'image width in pixels',
    'height': 'image height in pixels',
    'fov': 'horizontal field of view in degrees',
    'rate_hz': 'camera rate; in synchronous mode the world is ticked at this rate',
    'synchronous_mode': 'drive the server in synchronous mode with fixed_delta = 1/rate_hz',
    'publish_flow': 'publish ~/flow when the server has sensor.camera.optical_flow',
    'flow_convention': 'forward (lane_seg convention) or backward; see docs/carla.md',
    'publish_clock': 'publish /clock from CARLA simulation time',
}


def _coerce(name, value, default):
    """Parameter value in the type of its default (ints allowed for floats); ValueError."""
    kind = type(default)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: not isinstance(v, (str, bytes)) and hasattr(v, '__len__') and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
    }[kind]
    if not ok(value):
        raise ValueError(f'invalid parameters: {name}={value!r} must be of type {kind.__name__}')
    if kind is tuple:
        return tuple(float(x) for x in value)
    return kind(value)


def stamp_from_seconds(seconds):
    """``builtin_interfaces/Time`` from CARLA's simulation timestamp in seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f'timestamp {seconds!r} is not a finite, non-negative number')
    nanoseconds = int(round(seconds * 1e9))
    return Time(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def make_header(image, frame_id):
    """Header of a CARLA sensor image: its simulation timestamp and our frame_id."""
    return Header(stamp=stamp_from_seconds(float(image.timestamp)), frame_id=frame_id)


def _image_array(image, channels, dtype):
    width, height = int(image.width), int(image.height)
    data = np.frombuffer(image.raw_data, dtype=dtype)
    if data.size != width * height * channels:
        raise ValueError(
            f'frame {image.frame}: raw_data holds {data.size} {np.dtype(dtype).name} values, '
            f'expected width*height*{channels} = {width}*{height}*{channels}')
    return data.reshape(height, width, channels)


def rgb_to_msg(image, frame_id):
    """``sensor.camera.rgb`` image to a ``bgra8`` Image message (CARLA's memory layout)."""
    return numpy_to_image(_image_array(image, 4, np.uint8), 'bgra8',
                          header=make_header(image, frame_id))


def lane_mask_to_msg(image, tag, frame_id):
    """Raw ``sensor.camera.semantic_segmentation`` image to a ``mono8`` road-line mask."""
    mask = semantic_raw_to_lane_mask(_image_array(image, 4, np.uint8), tag)
    return numpy_to_image(mask, 'mono8', header=make_header(image, frame_id))


def flow_to_msg(image, previous, frame_id, convention='forward'):
    """
    ``sensor.camera.optical_flow`` image to a ``32FC2`` message in pixels, NaN out of view.

    ``previous`` is the flow camera's preceding image (only its ``frame`` is read). CARLA's
    image of frame ``t`` holds the pair (``t - 1``, ``t``), and the message is stamped with
    frame ``t``, the newer frame, whichever ``convention``: lane_seg's flow convention (the
    ``'forward'`` flow ``t - 1 -> t`` on frame ``t - 1``'s grid, stamped with frame ``t``, as
    ``flow_node`` publishes its estimate). Returns ``None`` when ``previous`` is missing or
    not the frame just before (the flow would span a frame nobody saw).
    """
    if previous is None or int(image.frame) != int(previous.frame) + 1:
        return None
    flow = carla_flow_to_pixels(_image_array(image, 2, np.float32), int(image.width),
                                int(image.height), convention=convention,
                                out_of_view=np.nan)
    return numpy_to_image(flow, '32FC2', header=make_header(image, frame_id))


def camera_info_msg(width, height, fov_deg, header):
    """Pinhole ``CameraInfo`` of a CARLA camera, computed as the CARLA ROS bridge does."""
    fx = width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    cx, cy = width / 2.0, height / 2.0
    info = CameraInfo(header=header, width=int(width), height=int(height))
    info.distortion_model = 'plumb_bob'
    info.d = [0.0] * 5
    info.k = [fx, 0.0, cx, 0.0, fx, cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [fx, 0.0, cx, 0.0, 0.0, fx, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def import_carla():
    """Import the optional ``carla`` client package or raise :class:`CarlaClientError`."""
    try:
        import carla
    except ImportError as exc:
        raise CarlaClientError(
            f'the CARLA Python client is not installed ({exc}); {INSTALL_HINT}') from None
    return carla


class CarlaCameraNode(Node):
    """Thin adapter: CARLA sensor callbacks -> converted ROS messages."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        try:
            self.config = self._read_config()
        except ValueError:
            self.destroy_node()
            raise
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.create_publisher(Image, self.config.image_topic, qos)
        self.info_pub = self.create_publisher(CameraInfo, self.config.camera_info_topic, qos)
        self.mask_pub = self.create_publisher(Image, '~/lane_mask', qos)
        self.flow_pub = self.create_publisher(Image, '~/flow', qos)
        self.clock_pub = (self.create_publisher(Clock, '/clock', qos)
                          if self.config.publish_clock else None)
        self.road_line_tag = None
        self.frames = {'rgb': 0, 'lane_mask': 0, 'flow': 0, 'errors': 0, 'skipped': 0}
        self._previous_flow = None
        self._carla = None
        self._client = None
        self._world = None
        self._original_settings = None
        self._actors = []
        self._tick_timer = None

    def _read_config(self):
        values = {}
        for name, field in CarlaCameraConfig.__dataclass_fields__.items():
            default = field.default
            if isinstance(default, tuple):
                default = [float(v) for v in default]
            descriptor = ParameterDescriptor(
                description=_DESCRIPTIONS[name], read_only=True, dynamic_typing=True)
            value = self.declare_parameter(name, default, descriptor).value
            values[name] = _coerce(name, value, field.default)
        return CarlaCameraConfig(**values)

    # Conversions from sensor callbacks (CARLA's threads) to messages.
    def _guarded(self, kind, convert, publisher, image):
        try:
            msg = convert(image)
        except Exception as exc:  # noqa: B902 - a bad frame must never kill the sensor thread
            self.frames['errors'] += 1
            self.get_logger().error(f'dropped {kind} frame: {exc}',
                                    throttle_duration_sec=5.0)
            return None
        if msg is None:
            self.frames['skipped'] += 1
            self.get_logger().info(
                f'no {kind} for frame {image.frame}: the previous frame is not frame '
                f'{int(image.frame) - 1} (first frame, or frames skipped)',
                throttle_duration_sec=5.0)
            return None
        publisher.publish(msg)
        self.frames[kind] += 1
        return msg

    def on_rgb(self, image):
        cfg = self.config
        msg = self._guarded('rgb', lambda img: rgb_to_msg(img, cfg.frame_id),
                            self.image_pub, image)
        if msg is not None:
            self.info_pub.publish(camera_info_msg(msg.width, msg.height, cfg.fov, msg.header))
            if self.clock_pub is not None:
                self.clock_pub.publish(Clock(clock=msg.header.stamp))
        return msg

    def on_semantic(self, image):
        return self._guarded(
            'lane_mask', lambda img: lane_mask_to_msg(img, self.road_line_tag,
                                                      self.config.frame_id),
            self.mask_pub, image)

    def on_flow(self, image):
        previous, self._previous_flow = self._previous_flow, _PreviousFlow(int(image.frame))
        return self._guarded(
            'flow', lambda img: flow_to_msg(img, previous, self.config.frame_id,
                                            self.config.flow_convention),
            self.flow_pub, image)

    # CARLA side.
    def connect(self):
        """Connect, attach or spawn the vehicle and its cameras; CarlaClientError on failure."""
        cfg = self.config
        carla = self._carla = import_carla()
        where = f'{cfg.host}:{cfg.port}'
        try:
            self._client = carla.Client(cfg.host, cfg.port)
            self._client.set_timeout(cfg.timeout_s)
            server_version = self._client.get_server_version()
            self._world = self._client.get_world()
        except RuntimeError as exc:
            raise CarlaClientError(
                f'no CARLA server reachable at {where} within timeout_s={cfg.timeout_s:g} s '
                f'({exc}); start the server or set the host/port/timeout_s parameters'
            ) from None
        client_version = self._client.get_client_version()
        if client_version.split('-')[0] != server_version.split('-')[0]:
            self.get_logger().warning(
                f'carla client {client_version} differs from server {server_version}; the API '
                f'may not match: pip install carla=={server_version.split("-")[0]}')
        self.road_line_tag = road_line_tag(server_version)
        vehicle = self._find_or_spawn_vehicle()
        if cfg.synchronous_mode:
            self._original_settings = self._world.get_settings()
            settings = self._world.get_settings()
            settings.synchronous_mode = True
            settings.fixed_delta_seconds = 1.0 / cfg.rate_hz
            self._world.apply_settings(settings)
        library = self._world.get_blueprint_library()
        self._attach_camera(library, 'sensor.camera.rgb', vehicle, self.on_rgb)
        self._attach_camera(library, 'sensor.camera.semantic_segmentation', vehicle,
                            self.on_semantic)
        has_flow = (server_supports_optical_flow(server_version)
                    and len(library.filter('sensor.camera.optical_flow')) > 0)
        if cfg.publish_flow and has_flow:
            self._attach_camera(library, 'sensor.camera.optical_flow', vehicle, self.on_flow)
        if cfg.synchronous_mode:
            # A steady clock: with use_sim_time the ROS clock only advances once we tick.
            self._tick_timer = self.create_timer(
                1.0 / cfg.rate_hz, self._tick, clock=RosClock(clock_type=ClockType.STEADY_TIME))
        elif cfg.publish_flow and has_flow:
            self.get_logger().warning(
                "asynchronous mode: CARLA's flow spans one server frame, not one camera "
                'frame, so ~/flow is published only for consecutive server frames; use '
                'synchronous_mode:=true for flow ground truth')
        flow_text = (f'{cfg.flow_convention} flow on ~/flow' if cfg.publish_flow and has_flow
                     else 'no flow camera')
        self.get_logger().info(
            f'CARLA server {server_version} at {where}, vehicle {vehicle.type_id} '
            f'(role_name {cfg.role_name}), road-line tag {self.road_line_tag}, '
            f'{cfg.width}x{cfg.height} at {cfg.rate_hz:g} Hz, '
            f'{"synchronous" if cfg.synchronous_mode else "asynchronous"} mode, {flow_text}; '
            f'publishing {cfg.image_topic}')

    def _find_or_spawn_vehicle(self):
        cfg = self.config
        for actor in self._world.get_actors().filter('vehicle.*'):
            if actor.attributes.get('role_name') == cfg.role_name:
                return actor
        if not cfg.spawn:
            raise CarlaClientError(
                f'no vehicle with role_name {cfg.role_name!r} in the CARLA world; start one '
                "(e.g. the bridge's carla_spawn_objects) or set spawn:=true")
        blueprints = self._world.get_blueprint_library().filter(cfg.vehicle_filter)
        if len(blueprints) == 0:
            raise CarlaClientError(f'no vehicle blueprint matches {cfg.vehicle_filter!r}')
        blueprint = blueprints[0]
        if blueprint.has_attribute('role_name'):
            blueprint.set_attribute('role_name', cfg.role_name)
        for point in self._world.get_map().get_spawn_points():
            vehicle = self._world.try_spawn_actor(blueprint, point)
            if vehicle is not None:
                self._actors.append(vehicle)
                if cfg.autopilot:
                    manager = self._client.get_trafficmanager(cfg.tm_port)
                    manager.set_synchronous_mode(cfg.synchronous_mode)
                    vehicle.set_autopilot(True, cfg.tm_port)
                return vehicle
        raise CarlaClientError('every spawn point of the map is occupied')

    def _attach_camera(self, library, type_id, vehicle, callback):
        cfg = self.config
        carla = self._carla
        blueprint = library.find(type_id)
        blueprint.set_attribute('image_size_x', str(cfg.width))
        blueprint.set_attribute('image_size_y', str(cfg.height))
        blueprint.set_attribute('fov', str(cfg.fov))
        if not cfg.synchronous_mode:
            blueprint.set_attribute('sensor_tick', str(1.0 / cfg.rate_hz))
        x, y, z, roll, pitch, yaw = cfg.camera_pose
        transform = carla.Transform(carla.Location(x=x, y=y, z=z),
                                    carla.Rotation(roll=roll, pitch=pitch, yaw=yaw))
        sensor = self._world.spawn_actor(blueprint, transform, attach_to=vehicle)
        self._actors.append(sensor)
        sensor.listen(callback)
        return sensor

    def _tick(self):
        try:
            self._world.tick(self.config.timeout_s)
        except RuntimeError as exc:
            self.get_logger().error(f'world.tick() failed: {exc}', throttle_duration_sec=5.0)

    def close(self):
        """Stop and destroy what we spawned and restore the world settings we changed."""
        if self._tick_timer is not None:
            self.destroy_timer(self._tick_timer)
            self._tick_timer = None
        for actor in reversed(self._actors):
            try:
                if hasattr(actor, 'stop'):
                    actor.stop()
                actor.destroy()
            except RuntimeError as exc:
                self.get_logger().warning(f'could not destroy {actor}: {exc}')
        self._actors = []
        if self._original_settings is not None:
            try:
                self._world.apply_settings(self._original_settings)
            except RuntimeError as exc:
                self.get_logger().warning(f'could not restore the world settings: {exc}')
            self._original_settings = None


def main(args=None):
    """Run the node; returns 0 on a clean shutdown, 1 when CARLA is unusable, 2 on bad params."""
    tune_process(warn=get_logger(NODE_NAME).warning)
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = CarlaCameraNode()
        node.connect()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError as exc:      # CarlaClientError, or the carla client's own errors
        _log_error(node, str(exc) if isinstance(exc, CarlaClientError) else f'CARLA: {exc}')
        code = 1
    except ValueError as exc:
        _log_error(node, str(exc))
        code = 2
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return code


def _log_error(node, text):
    if node is not None:
        node.get_logger().error(text)
    else:
        get_logger(NODE_NAME).error(text)


if __name__ == '__main__':
    sys.exit(main())
