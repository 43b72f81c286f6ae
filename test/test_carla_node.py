"""
carla_camera_node without a CARLA server.

No CARLA server exists here, so: ``main()`` must fail fast and clearly when the ``carla``
package is missing or the server is unreachable; the image-to-message callbacks are fed
stand-in CARLA images (objects with ``width``, ``height``, ``raw_data``, ``frame`` and
``timestamp``, which is all the callbacks read); the publishing path runs through real rclpy.
"""

import sys
import time
import types

from lane_seg.carla import client_node
from lane_seg.image_conversion import image_to_numpy
import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image

W, H = 32, 24
UNREACHABLE = ['--ros-args', '-p', 'host:=127.0.0.1', '-p', 'port:=1', '-p', 'timeout_s:=0.5']


class FakeCarlaImage:
    """What a carla.Image / carla.OpticalFlowImage offers the callbacks."""

    def __init__(self, array, frame=7, timestamp=12.345678901):
        self.height, self.width = array.shape[:2]
        self.raw_data = memoryview(np.ascontiguousarray(array).tobytes())
        self.frame = frame
        self.timestamp = timestamp


def _bgra():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 4), dtype=np.uint8)


def _semantic(tag):
    img = np.zeros((H, W, 4), np.uint8)
    img[..., 2] = 1           # CARLA's tag sits in the red channel
    img[5:7, :, 2] = tag
    img[9, :, 2] = 6 if tag == 24 else 24   # the other generation's road-line tag
    return img


# ---------------------------------------------------------------- main() fails fast and clearly

def test_main_without_the_carla_package(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, 'carla', None)   # makes `import carla` fail
    start = time.monotonic()
    code = client_node.main(UNREACHABLE)
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert code != 0
    assert elapsed < 3.0
    assert 'ERROR' in err and 'pip install carla==' in err


def _fake_carla_module():
    """Make a ``carla`` module whose client acts like the real one with no server listening."""
    module = types.ModuleType('carla')

    class Client:

        def __init__(self, host, port):
            self.where = f'{host}:{port}'
            self.timeout = 5.0

        def set_timeout(self, seconds):
            self.timeout = seconds

        def get_server_version(self):
            time.sleep(self.timeout)
            raise RuntimeError(
                f'time-out of {int(self.timeout * 1000)}ms while waiting for the simulator, '
                f'make sure the simulator is ready and connected to {self.where}')

    module.Client = Client
    return module


def _check_unreachable(capfd):
    start = time.monotonic()
    code = client_node.main(UNREACHABLE)
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert code != 0
    assert 0.4 < elapsed < 3.0
    assert 'ERROR' in err
    assert '127.0.0.1:1' in err and 'timeout_s=0.5' in err


def test_main_with_no_server_reachable(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, 'carla', _fake_carla_module())
    _check_unreachable(capfd)


def test_main_with_the_real_client_and_no_server(capfd):
    pytest.importorskip('carla', reason='the optional carla client package is not installed')
    _check_unreachable(capfd)


def test_main_refuses_bad_parameters(capfd):
    code = client_node.main(['--ros-args', '-p', 'port:=0', '-p', 'fov:=200.0'])
    err = capfd.readouterr().err
    assert code == 2
    assert 'port=0' in err and 'fov=200' in err


def test_main_refuses_a_wrongly_typed_parameter(capfd):
    code = client_node.main(['--ros-args', '-p', 'port:=abc'])
    assert code == 2
    assert 'port' in capfd.readouterr().err


def test_config_accepts_integers_for_floats():
    assert client_node._coerce('timeout_s', 1, 2.0) == 1.0
    assert client_node._coerce('camera_pose', [1, 0, 2, 0, 0, 0], (0.0,)) == (1.0, 0.0, 2.0,
                                                                              0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match='spawn'):
        client_node._coerce('spawn', 1, False)


# ---------------------------------------------------------------- image -> message conversions

def test_rgb_to_msg_keeps_bgra_and_the_carla_timestamp():
    bgra = _bgra()
    msg = client_node.rgb_to_msg(FakeCarlaImage(bgra), 'ego/rgb_front')
    assert (msg.encoding, msg.width, msg.height, msg.step) == ('bgra8', W, H, W * 4)
    assert msg.header.frame_id == 'ego/rgb_front'
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 345678901)
    np.testing.assert_array_equal(image_to_numpy(msg), bgra)


@pytest.mark.parametrize('tag', [6, 24])
def test_lane_mask_to_msg_uses_the_server_tag(tag):
    msg = client_node.lane_mask_to_msg(FakeCarlaImage(_semantic(tag)), tag, 'f')
    mask = image_to_numpy(msg)
    assert msg.encoding == 'mono8' and mask.shape == (H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[5:7] = 255
    np.testing.assert_array_equal(mask, expected)


def test_flow_to_msg_is_32fc2_pixels_in_our_convention():
    raw = np.zeros((H, W, 2), np.float32)
    raw[..., 0] = 2 / (W / 2)        # 2 px to the right since the previous frame
    raw[..., 1] = 1 / (H / 2)        # 1 px up (CARLA's y points up)
    previous = FakeCarlaImage(raw, frame=6, timestamp=12.295678901)
    image = FakeCarlaImage(raw, frame=7, timestamp=12.345678901)
    msg = client_node.flow_to_msg(image, previous, 'f')
    flow = image_to_numpy(msg)
    assert msg.encoding == '32FC2' and flow.shape == (H, W, 2) and flow.dtype == np.float32
    # Forward flow of the pair (6, 7) lives on frame 6's grid and, like flow_node's output,
    # carries the newer frame 7's stamp.
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 345678901)
    assert msg.header.frame_id == 'f'
    inside = flow[1:, :-2]
    np.testing.assert_allclose(inside[..., 0], 2, atol=1e-4)
    np.testing.assert_allclose(inside[..., 1], -1, atol=1e-4)
    # Points that leave the view (last 2 columns go right, first row goes up) are NaN.
    assert np.isnan(flow[:, -2:]).all() and np.isnan(flow[0]).all()
    assert np.isfinite(inside).all()
    backward = client_node.flow_to_msg(image, previous, 'f', 'backward')
    assert (backward.header.stamp.sec, backward.header.stamp.nanosec) == (12, 345678901)
    back = image_to_numpy(backward)
    np.testing.assert_allclose(back[:-1, 2:], np.broadcast_to([-2, 1], back[:-1, 2:].shape),
                               atol=1e-4)
    assert np.isnan(back[-1]).all() and np.isnan(back[:, :2]).all()


@pytest.mark.parametrize('previous_frame', [None, 5, 7])
def test_flow_to_msg_needs_the_frame_just_before(previous_frame):
    raw = np.zeros((H, W, 2), np.float32)
    previous = None if previous_frame is None else FakeCarlaImage(raw, frame=previous_frame)
    assert client_node.flow_to_msg(FakeCarlaImage(raw, frame=7), previous, 'f') is None


def test_conversions_reject_a_short_buffer():
    short = FakeCarlaImage(_bgra())
    short.raw_data = short.raw_data[:-4]
    with pytest.raises(ValueError, match='frame 7'):
        client_node.rgb_to_msg(short, 'f')
    with pytest.raises(ValueError):     # bytes of the wrong size for float pairs
        client_node.flow_to_msg(FakeCarlaImage(_bgra(), frame=7),
                                FakeCarlaImage(_bgra(), frame=6), 'f')


def test_camera_info_is_the_bridge_pinhole():
    header = client_node.make_header(FakeCarlaImage(_bgra(), timestamp=1.5), 'f')
    info = client_node.camera_info_msg(800, 600, 90.0, header)
    assert (info.width, info.height, info.distortion_model) == (800, 600, 'plumb_bob')
    np.testing.assert_allclose(info.k, [400, 0, 400, 0, 400, 300, 0, 0, 1], atol=1e-9)
    assert info.p[0] == pytest.approx(400) and info.p[10] == 1.0
    assert (info.header.stamp.sec, info.header.stamp.nanosec) == (1, 500_000_000)


@pytest.mark.parametrize('bad', [-1.0, float('nan'), float('inf')])
def test_stamp_rejects_bad_timestamps(bad):
    with pytest.raises(ValueError):
        client_node.stamp_from_seconds(bad)


# ---------------------------------------------------------------- publishing through rclpy

@pytest.fixture
def ros():
    rclpy.init()
    nodes = []
    yield nodes
    for node in nodes:
        node.destroy_node()
    rclpy.try_shutdown()


@pytest.mark.ros
def test_callbacks_publish_on_the_bridge_topics(ros):
    role = 'carla_node_test_ego'
    node = client_node.CarlaCameraNode(parameter_overrides=[
        Parameter('role_name', value=role), Parameter('fov', value=90.0)])
    node.road_line_tag = 24          # what connect() sets from the server version
    listener = rclpy.create_node('carla_node_test_listener')
    ros.extend([node, listener])
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    got = {}
    topics = {
        f'/carla/{role}/rgb_front/image': Image,
        f'/carla/{role}/rgb_front/camera_info': CameraInfo,
        '/carla_camera_node/lane_mask': Image,
        '/carla_camera_node/flow': Image,
        '/clock': Clock,
    }
    for topic, kind in topics.items():
        got[topic] = []
        listener.create_subscription(kind, topic, got[topic].append, qos)
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(listener)
    publishers = [node.image_pub, node.info_pub, node.mask_pub, node.flow_pub, node.clock_pub]
    deadline = time.monotonic() + 10.0
    while (min(p.get_subscription_count() for p in publishers) == 0
           and time.monotonic() < deadline):
        executor.spin_once(timeout_sec=0.05)

    bgra = _bgra()
    raw_flow = np.full((H, W, 2), 0.25 / W, np.float32)     # 0.125 px right, a bit up
    stamps = {0: 1.0, 1: 1.05}
    for frame, stamp in stamps.items():
        node.on_rgb(FakeCarlaImage(bgra, frame, stamp))
        node.on_semantic(FakeCarlaImage(_semantic(24), frame, stamp))
        node.on_flow(FakeCarlaImage(raw_flow, frame, stamp))
    expected = dict.fromkeys(topics, 2)
    expected['/carla_camera_node/flow'] = 1      # frame 0 has no previous frame
    deadline = time.monotonic() + 10.0
    while (any(len(got[t]) < n for t, n in expected.items())
           and time.monotonic() < deadline):
        executor.spin_once(timeout_sec=0.05)
    executor.shutdown()
    assert {t: len(m) for t, m in got.items()} == expected
    assert node.frames == {'rgb': 2, 'lane_mask': 2, 'flow': 1, 'errors': 0, 'skipped': 1}

    images = got[f'/carla/{role}/rgb_front/image']
    assert [m.header.stamp.nanosec for m in images] == [0, 50_000_000]
    assert all(m.encoding == 'bgra8' and m.header.frame_id == f'{role}/rgb_front'
               for m in images)
    np.testing.assert_array_equal(image_to_numpy(images[0]), bgra)
    infos = got[f'/carla/{role}/rgb_front/camera_info']
    assert [i.header for i in infos] == [m.header for m in images]
    assert (infos[0].width, infos[0].height) == (W, H)
    masks = got['/carla_camera_node/lane_mask']
    assert [m.header for m in masks] == [m.header for m in images]
    assert masks[0].encoding == 'mono8'
    assert np.count_nonzero(image_to_numpy(masks[0])) == 2 * W
    flow = got['/carla_camera_node/flow'][0]
    # The pair (0, 1), on frame 0's grid, goes out with frame 1 and carries its header.
    assert flow.encoding == '32FC2' and flow.header == images[1].header
    values = image_to_numpy(flow)[1:, :-1]
    np.testing.assert_allclose(values[..., 0], 0.125, atol=1e-4)
    np.testing.assert_allclose(values[..., 1], -0.25 / W * H / 2, atol=1e-4)
    assert [c.clock for c in got['/clock']] == [m.header.stamp for m in images]


@pytest.mark.ros
def test_a_bad_frame_is_counted_not_raised(ros):
    node = client_node.CarlaCameraNode()
    ros.append(node)
    node.road_line_tag = 24
    bad = FakeCarlaImage(_bgra())
    bad.raw_data = bad.raw_data[:10]
    assert node.on_rgb(bad) is None
    assert node.on_flow(FakeCarlaImage(np.zeros((H, W, 2), np.float32), frame=6)) is None
    assert node.on_flow(FakeCarlaImage(_bgra(), frame=7)) is None   # wrong byte count
    assert node.frames['errors'] == 2 and node.frames['skipped'] == 1
    assert node.on_semantic(FakeCarlaImage(_semantic(24))) is not None
    assert node.frames['lane_mask'] == 1
    assert node.frames['rgb'] == 0
    node.close()        # nothing spawned: a no-op
