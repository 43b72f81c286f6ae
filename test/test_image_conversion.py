"""Tests for lane_seg.image_conversion with real rclpy and rosbags Image messages."""

import subprocess
import sys
import types

from builtin_interfaces.msg import Time
from lane_seg.image_conversion import (
    image_to_numpy, ImageConversionError, numpy_to_image, SUPPORTED_ENCODINGS, to_bgr8)
import numpy as np
import pytest
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import Image
from std_msgs.msg import Header

ENCODINGS = sorted(SUPPORTED_ENCODINGS)
MULTI_BYTE = ['mono16', '32FC1', '32FC2']
TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
BAG_IMAGE = TYPESTORE.types['sensor_msgs/msg/Image']
BAG_HEADER = TYPESTORE.types['std_msgs/msg/Header']
BAG_TIME = TYPESTORE.types['builtin_interfaces/msg/Time']


def random_image(encoding, height=5, width=7, seed=0):
    dtype, channels = SUPPORTED_ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    if dtype.kind == 'f':
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def padded_bytes(arr, pad, byteorder='='):
    """Rows of ``arr`` in ``byteorder``, each followed by ``pad`` bytes of garbage."""
    rng = np.random.default_rng(42)
    wire = arr.astype(arr.dtype.newbyteorder(byteorder))
    rows = [wire[r].tobytes() + rng.integers(0, 256, pad, dtype=np.uint8).tobytes()
            for r in range(arr.shape[0])]
    return b''.join(rows)


def duck_msg(**fields):
    base = {'header': None, 'height': 4, 'width': 5, 'encoding': 'bgr8', 'is_bigendian': 0,
            'step': 15, 'data': np.arange(60, dtype=np.uint8)}
    base.update(fields)
    return types.SimpleNamespace(**base)


def test_supported_encodings_exact():
    assert set(SUPPORTED_ENCODINGS) == {
        'bgr8', 'rgb8', 'bgra8', 'rgba8', 'mono8', 'mono16', '32FC1', '32FC2'}
    assert issubclass(ImageConversionError, ValueError)


def test_module_is_pure_core():
    code = ('import sys, lane_seg.image_conversion; '
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('rclpy', 'sensor_msgs', 'std_msgs', 'rosbags')]; "
            'assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('encoding', ENCODINGS)
def test_round_trip_rclpy(encoding):
    arr = random_image(encoding)
    msg = numpy_to_image(arr, encoding)
    assert isinstance(msg, Image)
    pixel_size = arr.itemsize * (arr.shape[2] if arr.ndim == 3 else 1)
    assert (msg.height, msg.width, msg.encoding) == (5, 7, encoding)
    assert msg.step == 7 * pixel_size
    assert msg.is_bigendian == int(sys.byteorder == 'big')
    assert len(msg.data) == msg.step * msg.height
    out = image_to_numpy(msg)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize('encoding', ENCODINGS)
def test_round_trip_through_rosbags_cdr(encoding):
    arr = random_image(encoding, seed=3)
    template = BAG_IMAGE(header=BAG_HEADER(stamp=BAG_TIME(sec=0, nanosec=0), frame_id=''),
                         height=0, width=0, encoding='', is_bigendian=0, step=0,
                         data=np.zeros(0, np.uint8))
    header = BAG_HEADER(stamp=BAG_TIME(sec=12, nanosec=34), frame_id='cam')
    msg = numpy_to_image(arr, encoding, header=header, msg=template)
    assert isinstance(msg.data, np.ndarray) and msg.data.dtype == np.uint8
    raw = TYPESTORE.serialize_cdr(msg, BAG_IMAGE.__msgtype__)
    back = TYPESTORE.deserialize_cdr(raw, BAG_IMAGE.__msgtype__)
    assert back.header.frame_id == 'cam' and back.header.stamp.sec == 12
    np.testing.assert_array_equal(image_to_numpy(back), arr)


def test_numpy_to_image_does_not_alias_input():
    arr = random_image('bgr8')
    msg = numpy_to_image(arr, 'bgr8')
    arr[0, 0, 0] ^= 0xFF
    assert image_to_numpy(msg)[0, 0, 0] != arr[0, 0, 0]


@pytest.mark.parametrize('encoding', ENCODINGS)
@pytest.mark.parametrize('kind', ['rclpy', 'duck'])
def test_row_padding(encoding, kind):
    arr = random_image(encoding, height=4, width=3, seed=1)
    pad = 3 * arr.itemsize
    data = padded_bytes(arr, pad)
    row_bytes = arr[0].nbytes
    fields = {'height': 4, 'width': 3, 'encoding': encoding,
              'is_bigendian': int(sys.byteorder == 'big'), 'step': row_bytes + pad}
    if kind == 'rclpy':
        msg = Image(data=data, **fields)
    else:
        msg = types.SimpleNamespace(header=None, data=np.frombuffer(data, np.uint8).copy(),
                                    **fields)
    out = image_to_numpy(msg)
    assert out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize('encoding', MULTI_BYTE)
@pytest.mark.parametrize('pad_elems', [0, 2])
def test_big_endian(encoding, pad_elems):
    arr = random_image(encoding, height=3, width=5, seed=2)
    pad = pad_elems * arr.itemsize
    msg = Image(height=3, width=5, encoding=encoding, is_bigendian=1,
                step=arr[0].nbytes + pad, data=padded_bytes(arr, pad, '>'))
    out = image_to_numpy(msg)
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize('encoding', MULTI_BYTE)
def test_little_endian_explicit(encoding):
    arr = random_image(encoding, height=2, width=3, seed=5)
    msg = duck_msg(height=2, width=3, encoding=encoding, is_bigendian=0, step=arr[0].nbytes,
                   data=np.frombuffer(arr.astype(arr.dtype.newbyteorder('<')).tobytes(),
                                      np.uint8))
    np.testing.assert_array_equal(image_to_numpy(msg), arr)


def test_big_endian_flag_ignored_for_bytes():
    arr = random_image('rgb8', height=2, width=2)
    msg = duck_msg(height=2, width=2, encoding='rgb8', is_bigendian=1, step=6,
                   data=arr.reshape(-1).copy())
    np.testing.assert_array_equal(image_to_numpy(msg), arr)


def test_no_copy_duck_numpy_data():
    data = np.arange(60, dtype=np.uint8)
    msg = duck_msg(data=data)
    out = image_to_numpy(msg)
    assert out.shape == (4, 5, 3)
    assert np.shares_memory(out, data)
    data[0] = 200
    assert out[0, 0, 0] == 200


def test_no_copy_rclpy_array_data():
    msg = Image(height=4, width=5, encoding='bgr8', step=15, data=bytes(range(60)))
    out = image_to_numpy(msg)
    assert out.shape == (4, 5, 3) and out[3, 4, 2] == 59
    msg.data[59] = 7
    assert out[3, 4, 2] == 7


def test_no_copy_mono16_native():
    arr = random_image('mono16', height=4, width=6)
    msg = numpy_to_image(arr, 'mono16')
    out = image_to_numpy(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_header_passthrough():
    header = Header(stamp=Time(sec=1700000000, nanosec=123456789), frame_id='front_camera')
    msg = numpy_to_image(random_image('bgr8'), 'bgr8', header=header)
    assert msg.header.stamp.sec == 1700000000
    assert msg.header.stamp.nanosec == 123456789
    assert msg.header.frame_id == 'front_camera'


def test_header_untouched_without_header_argument():
    msg = Image()
    msg.header.frame_id = 'keep'
    numpy_to_image(random_image('mono8'), 'mono8', msg=msg)
    assert msg.header.frame_id == 'keep'


def test_rosbags_style_duck_message():
    arr = random_image('32FC2', height=3, width=4, seed=9)
    raw = np.frombuffer(arr.tobytes(), dtype=np.uint8)  # read-only, like rosbags
    msg = types.SimpleNamespace(
        header=types.SimpleNamespace(frame_id='cam'), height=3, width=4, encoding='32FC2',
        is_bigendian=int(sys.byteorder == 'big'), step=32, data=raw)
    out = image_to_numpy(msg)
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, raw)


@pytest.mark.parametrize('fields, match', [
    ({'encoding': 'yuv422'}, r"unknown encoding 'yuv422'; supported: bgr8, rgb8"),
    ({'encoding': None}, r'unknown encoding None'),
    ({'width': 0, 'step': 0, 'data': np.zeros(0, np.uint8)}, r'^zero width$'),
    ({'height': 0, 'data': np.zeros(0, np.uint8)}, r'^zero height$'),
    ({'width': -2}, r'negative width=-2'),
    ({'data': np.zeros(59, np.uint8)}, r'len\(data\)=59 != step\*height=60'),
    ({'data': np.zeros(61, np.uint8)}, r'len\(data\)=61 != step\*height=60'),
    ({'data': b''}, r'len\(data\)=0 != step\*height=60'),
    ({'step': 14, 'data': np.zeros(56, np.uint8)}, r'step=14 < width\*pixel_size=15'),
    ({'step': -15}, r'step=-15 < width\*pixel_size=15'),
    ({'height': 100000, 'width': 100000}, r'height\*width 100000x100000 exceeds limit'),
    ({'height': 16385, 'width': 1}, r'height\*width 16385x1 exceeds limit'),
    ({'height': 8192, 'width': 16384}, r'height\*width 8192x16384 exceeds limit'),
    ({'encoding': '32FC1', 'width': 2, 'step': 9, 'data': np.zeros(36, np.uint8)},
     r'step=9 is not a multiple of the element size 4 of 32FC1'),
    ({'encoding': 'mono16', 'width': 2, 'step': 5, 'data': np.zeros(20, np.uint8)},
     r'step=5 is not a multiple of the element size 2 of mono16'),
    ({'height': '4'}, r"height='4' is not an integer"),
    ({'step': 15.0}, r'step=15.0 is not an integer'),
    ({'data': np.zeros(60, np.float64)}, r'data has dtype float64, expected uint8'),
    ({'data': [300] * 60}, r'data is not a byte buffer'),
])
def test_malformed_message(fields, match):
    with pytest.raises(ImageConversionError, match=match):
        image_to_numpy(duck_msg(**fields))


def test_malformed_rclpy_message():
    msg = Image(height=4, width=5, encoding='bgr8', step=15, data=bytes(59))
    with pytest.raises(ImageConversionError, match=r'len\(data\)=59 != step\*height=60'):
        image_to_numpy(msg)


@pytest.mark.parametrize('array, encoding, match', [
    (np.zeros((4, 5, 3), np.float32), 'bgr8', r'bgr8 needs dtype uint8, got float32'),
    (np.zeros((4, 5), np.uint8), 'bgr8', r'bgr8 needs shape \(H, W, 3\), got \(4, 5\)'),
    (np.zeros((4, 5, 4), np.uint8), 'bgr8', r'bgr8 needs shape \(H, W, 3\), got \(4, 5, 4\)'),
    (np.zeros((4, 5, 3), np.uint8), 'rgba8', r'rgba8 needs shape \(H, W, 4\)'),
    (np.zeros((4, 5, 2), np.uint16), 'mono16', r'mono16 needs shape \(H, W\), got \(4, 5, 2\)'),
    (np.zeros((4, 5), np.uint8), 'mono16', r'mono16 needs dtype uint16, got uint8'),
    (np.zeros((4, 5, 2), np.float64), '32FC2', r'32FC2 needs dtype float32, got float64'),
    (np.zeros((4, 5), np.float32), '32FC2', r'32FC2 needs shape \(H, W, 2\)'),
    (np.zeros(20, np.uint8), 'mono8', r'mono8 needs shape \(H, W\), got \(20,\)'),
    (np.zeros((0, 5, 3), np.uint8), 'bgr8', r'^zero height$'),
    (np.zeros((4, 0), np.float32), '32FC1', r'^zero width$'),
    (np.zeros((16385, 1), np.uint8), 'mono8', r'height\*width 16385x1 exceeds limit'),
    (np.zeros((4, 5), np.uint8), 'yuv422', r"unknown encoding 'yuv422'"),
])
def test_numpy_to_image_mismatch(array, encoding, match):
    with pytest.raises(ImageConversionError, match=match):
        numpy_to_image(array, encoding)


def test_numpy_to_image_accepts_single_channel_axis_and_foreign_byte_order():
    mono = random_image('mono8')
    np.testing.assert_array_equal(image_to_numpy(numpy_to_image(mono[..., None], 'mono8')), mono)
    depth = random_image('mono16')
    msg = numpy_to_image(depth.astype(depth.dtype.newbyteorder('S')), 'mono16')
    assert msg.is_bigendian == int(sys.byteorder == 'big')
    np.testing.assert_array_equal(image_to_numpy(msg), depth)


def test_numpy_to_image_non_contiguous_input():
    arr = random_image('rgb8', height=6, width=8)
    view = arr[::2, ::2]
    msg = numpy_to_image(view, 'rgb8')
    assert (msg.height, msg.width, msg.step) == (3, 4, 12)
    np.testing.assert_array_equal(image_to_numpy(msg), view)


BGR_EXPECTED = {
    'bgr8': lambda a: a,
    'rgb8': lambda a: a[..., ::-1],
    'bgra8': lambda a: a[..., :3],
    'rgba8': lambda a: a[..., 2::-1],
    'mono8': lambda a: np.repeat(a[..., None], 3, axis=2),
}


@pytest.mark.parametrize('encoding', sorted(BGR_EXPECTED))
def test_to_bgr8(encoding):
    arr = random_image(encoding, seed=4)
    expected = BGR_EXPECTED[encoding](arr)
    msg = numpy_to_image(arr, encoding)
    for source in (msg, arr):
        out = to_bgr8(source, encoding)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        assert out.flags.c_contiguous and out.flags.writeable
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(to_bgr8(msg), expected)


def test_to_bgr8_padded_read_only_message_gives_writeable_copy():
    arr = random_image('bgr8', height=3, width=4)
    data = padded_bytes(arr, 5)
    msg = duck_msg(height=3, width=4, step=17, data=np.frombuffer(data, np.uint8))
    out = to_bgr8(msg)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable and not np.shares_memory(out, msg.data)


@pytest.mark.parametrize('encoding', MULTI_BYTE)
def test_to_bgr8_rejects_non_colour(encoding):
    arr = random_image(encoding)
    with pytest.raises(ImageConversionError, match=f'cannot convert {encoding} to bgr8'):
        to_bgr8(arr, encoding)
    with pytest.raises(ImageConversionError, match=f'cannot convert {encoding} to bgr8'):
        to_bgr8(numpy_to_image(arr, encoding))


def test_to_bgr8_argument_errors():
    arr = random_image('bgr8')
    with pytest.raises(ImageConversionError, match='needs an explicit encoding'):
        to_bgr8(arr)
    with pytest.raises(ImageConversionError, match="'rgb8' does not match msg.encoding 'bgr8'"):
        to_bgr8(numpy_to_image(arr, 'bgr8'), 'rgb8')
    with pytest.raises(ImageConversionError, match="unknown encoding 'yuv422'"):
        to_bgr8(arr, 'yuv422')
    with pytest.raises(ImageConversionError, match='bgr8 needs dtype uint8'):
        to_bgr8(arr.astype(np.float32), 'bgr8')
