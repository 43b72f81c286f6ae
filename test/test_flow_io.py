"""Tests for lane_seg.flow: .flo and KITTI flow files, and the Middlebury colour coding."""

import cv2
from lane_seg.flow import color_wheel_legend
from lane_seg.flow import flow_to_color
from lane_seg.flow import FlowIOError
from lane_seg.flow import read_flo
from lane_seg.flow import read_kitti_flow
from lane_seg.flow import write_flo
from lane_seg.flow import write_kitti_flow
from lane_seg.flow.io import KITTI_MAX
from lane_seg.flow.io import KITTI_MIN
from lane_seg.flow.viz import COLOR_WHEEL
import numpy as np
import pytest


def random_flow(shape=(7, 11), scale=50.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((*shape, 2)) * scale).astype(np.float32)


def test_flo_round_trip_is_exact(tmp_path):
    flow = random_flow()
    flow[0, 0] = (1e9, -1e9)
    path = tmp_path / 'a.flo'
    write_flo(path, flow)
    data = path.read_bytes()
    assert data[:4] == b'PIEH'
    assert np.frombuffer(data[4:12], '<i4').tolist() == [11, 7]
    assert len(data) == 12 + 7 * 11 * 2 * 4
    back = read_flo(path)
    assert back.dtype == np.float32 and back.shape == (7, 11, 2)
    np.testing.assert_array_equal(back, flow)


def test_flo_layout_is_row_major_u_v(tmp_path):
    path = tmp_path / 'hand.flo'
    values = np.arange(12, dtype='<f4')  # 2 rows x 3 columns x (u, v)
    path.write_bytes(b'PIEH' + np.array([3, 2], '<i4').tobytes() + values.tobytes())
    flow = read_flo(path)
    assert flow.shape == (2, 3, 2)
    assert flow[0, 1].tolist() == [2.0, 3.0]
    assert flow[1, 0].tolist() == [6.0, 7.0]


@pytest.mark.parametrize('payload, problem', [
    (b'XXXX' + np.array([3, 2], '<i4').tobytes() + bytes(48), 'magic'),
    (b'PIEH' + np.array([3, 2], '<i4').tobytes() + bytes(40), 'truncated'),
    (b'PIEH\x03\x00', 'truncated'),
    (b'PIEH' + np.array([3, 2], '<i4').tobytes() + bytes(52), 'trailing'),
    (b'PIEH' + np.array([-3, 2], '<i4').tobytes(), 'absurd'),
    (b'PIEH' + np.array([10 ** 9, 10 ** 9], '<i4').tobytes(), 'absurd'),
])
def test_flo_bad_files_raise_naming_the_file(tmp_path, payload, problem):
    path = tmp_path / 'bad.flo'
    path.write_bytes(payload)
    with pytest.raises(FlowIOError, match=problem) as info:
        read_flo(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_flo_missing_file_and_bad_shape(tmp_path):
    with pytest.raises(FlowIOError, match='missing.flo'):
        read_flo(tmp_path / 'missing.flo')
    with pytest.raises(FlowIOError, match='shape'):
        write_flo(tmp_path / 'x.flo', np.zeros((4, 4, 3), np.float32))


def test_kitti_round_trip_within_a_64th(tmp_path):
    flow = random_flow((9, 13), scale=100.0, seed=1)
    flow[0, :3] = [(-0.5, -200.25), (-511.0, 3.0), (0.0, -0.015625)]
    valid = np.random.default_rng(2).random((9, 13)) > 0.3
    valid[0, :3] = True
    path = tmp_path / 'kitti.png'
    write_kitti_flow(path, flow, valid)
    back, back_valid = read_kitti_flow(path)
    assert back.dtype == np.float32 and back.shape == flow.shape
    assert back_valid.dtype == bool
    np.testing.assert_array_equal(back_valid, valid)
    assert np.abs(back[valid] - flow[valid]).max() <= 1 / 64
    assert (back[~valid] == 0).all()
    assert (back[0, :3] == flow[0, :3]).all()  # multiples of 1/64 survive exactly


def test_kitti_channel_order_is_u_v_valid_in_rgb(tmp_path):
    flow = np.zeros((2, 3, 2), np.float32)
    flow[..., 0] = 1.5
    flow[..., 1] = -2.0
    valid = np.array([[True, False, True], [True, True, False]])
    path = tmp_path / 'order.png'
    write_kitti_flow(path, flow, valid)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (2, 3, 3)
    assert (raw[..., 2][valid] == 2 ** 15 + 96).all()  # R (cv2's channel 2) holds u
    assert (raw[..., 1][valid] == 2 ** 15 - 128).all()  # G holds v
    np.testing.assert_array_equal(raw[..., 0] > 0, valid)  # B holds valid


def test_kitti_clips_and_invalidates_non_finite(tmp_path):
    flow = np.array([[[1000.0, -1000.0], [np.nan, 1.0], [np.inf, 2.0]]], np.float32)
    path = tmp_path / 'clip.png'
    write_kitti_flow(path, flow)
    back, valid = read_kitti_flow(path)
    assert valid.tolist() == [[True, False, False]]
    assert back[0, 0].tolist() == [KITTI_MAX, KITTI_MIN]


def test_kitti_rejects_wrong_files(tmp_path):
    eight_bit = tmp_path / 'eight.png'
    cv2.imwrite(str(eight_bit), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FlowIOError, match='16-bit') as info:
        read_kitti_flow(eight_bit)
    assert str(eight_bit) in str(info.value)
    garbage = tmp_path / 'garbage.png'
    garbage.write_bytes(np.random.default_rng(3).bytes(200))
    with pytest.raises(FlowIOError, match='garbage.png'):
        read_kitti_flow(garbage)
    with pytest.raises(FlowIOError, match='.png'):
        write_kitti_flow(tmp_path / 'flow.jpg', np.zeros((2, 2, 2)))


def expected_bgr(index_float, rad=1.0):
    """Colour the Middlebury way for wheel position ``index_float`` and magnitude ``rad``."""
    k0 = int(np.floor(index_float))
    f = index_float - k0
    col = ((1 - f) * COLOR_WHEEL[k0] + f * COLOR_WHEEL[(k0 + 1) % len(COLOR_WHEEL)]) / 255
    col = 1 - rad * (1 - col) if rad <= 1 else col * 0.75
    return np.floor(255 * col).astype(np.uint8)[::-1].tolist()


def test_color_wheel_table():
    assert COLOR_WHEEL.shape == (55, 3)
    starts = np.cumsum([0, 15, 6, 4, 11, 13])
    assert COLOR_WHEEL[starts].tolist() == [
        [255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255]]


def test_flow_to_color_matches_the_wheel():
    flow = np.zeros((1, 5, 2), np.float32)
    flow[0, 0] = (4, 0)  # +x: wheel index 0
    flow[0, 1] = (-4, 0)  # -x: wheel index 27
    flow[0, 2] = (0, 4)  # +y (down in the image): wheel index 13.5
    flow[0, 3] = (2, 0)  # +x at half the maximum
    image = flow_to_color(flow)
    assert image.dtype == np.uint8 and image.shape == (1, 5, 3)
    assert image[0, 0].tolist() == expected_bgr(0) == [0, 0, 255]
    assert image[0, 1].tolist() == expected_bgr(27)
    assert image[0, 2].tolist() == expected_bgr(13.5)
    assert image[0, 3].tolist() == expected_bgr(0, rad=0.5) == [127, 127, 255]
    assert image[0, 4].tolist() == [255, 255, 255]  # zero flow is white
    assert image[0, 0].tolist() != image[0, 1].tolist()


def test_flow_to_color_zero_invalid_and_max_flow():
    assert (flow_to_color(np.zeros((3, 4, 2))) == 255).all()
    flow = np.zeros((2, 3, 2), np.float32)
    flow[0, 0] = (2, 0)
    flow[0, 1] = (np.nan, 0)
    flow[0, 2] = (1e9, 0)
    flow[1, 0] = (1, 0)
    flow[1, 1] = (500, 500)
    valid = np.ones((2, 3), bool)
    valid[1, 1] = False
    image = flow_to_color(flow, max_flow=1.0, valid=valid)
    assert image[0, 1].tolist() == image[0, 2].tolist() == image[1, 1].tolist() == [0, 0, 0]
    assert image[0, 0].tolist() == expected_bgr(0, rad=2.0) == [0, 0, 191]  # beyond: darker
    assert image[1, 0].tolist() == [0, 0, 255]
    # Without max_flow the invalid 500 px vector does not set the scale: 2 px is the maximum.
    assert flow_to_color(flow, valid=valid)[1, 0].tolist() == expected_bgr(0, rad=0.5)


def test_opposite_directions_differ():
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    flow = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None]
    colors = flow_to_color(np.concatenate([flow, -flow]))
    assert (colors[0] != colors[1]).any(axis=-1).all()


def test_color_wheel_legend():
    legend = color_wheel_legend(65)
    assert legend.dtype == np.uint8 and legend.shape == (65, 65, 3)
    assert legend[32, 32].tolist() == [255, 255, 255]
    assert legend[0, 0].tolist() == [0, 0, 0]
    assert legend[32, 64].tolist() == [0, 0, 255]  # rightwards flow is red
