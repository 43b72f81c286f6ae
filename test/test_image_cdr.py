"""Serialized ``sensor_msgs/Image`` (lane_seg.image_cdr) against rclpy's own CDR."""

from lane_seg.image_cdr import decode_image, encode_image, encode_like, MIN_IMAGE_BYTES
from lane_seg.image_conversion import image_to_numpy, ImageConversionError, numpy_to_image
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

ARRAYS = {
    'bgra8': lambda rng: rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
    'bgr8': lambda rng: rng.integers(0, 256, (3, 7, 3), dtype=np.uint8),
    'mono8': lambda rng: rng.integers(0, 256, (5, 3), dtype=np.uint8),
    'mono16': lambda rng: rng.integers(0, 65536, (2, 3), dtype=np.uint16),
    '32FC1': lambda rng: rng.standard_normal((4, 4)).astype(np.float32),
    '32FC2': lambda rng: rng.standard_normal((3, 5, 2)).astype(np.float32),
}


@pytest.mark.parametrize('encoding', sorted(ARRAYS))
@pytest.mark.parametrize('frame_id', ['', 'c', 'cam', 'ego_vehicle/rgb_front', 'x' * 8])
def test_encoded_bytes_match_rclpy_serialization(encoding, frame_id):
    arr = ARRAYS[encoding](np.random.default_rng(len(frame_id)))
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 1_700_000_123, 999_999_999
    original = numpy_to_image(arr, encoding, header=header)
    expected = serialize_message(original)
    got = encode_image(arr, encoding, 1_700_000_123, 999_999_999, frame_id)
    assert isinstance(got, bytes)
    # Same layout; rclpy leaves its alignment padding uninitialised, so compare field by field.
    assert len(got) == len(expected)
    assert got[-arr.nbytes:] == expected[-arr.nbytes:] == arr.tobytes()
    assert deserialize_message(got, Image) == original
    theirs = decode_image(expected)
    assert (theirs.header.stamp.sec, theirs.header.stamp.nanosec) == (1_700_000_123, 999_999_999)
    assert (theirs.header.frame_id, theirs.encoding, theirs.step) == (frame_id, encoding,
                                                                      original.step)
    np.testing.assert_array_equal(image_to_numpy(theirs), arr)


def test_decode_reads_what_rclpy_wrote_including_row_padding():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = arr.reshape(2, 9)
    msg = Image(height=2, width=3, encoding='rgb8', step=12, data=padded.tobytes())
    msg.header.frame_id = 'cam'
    msg.header.stamp.sec, msg.header.stamp.nanosec = 5, 6
    decoded = decode_image(serialize_message(msg))
    assert (decoded.header.stamp.sec, decoded.header.stamp.nanosec) == (5, 6)
    assert (decoded.header.frame_id, decoded.step, decoded.encoding) == ('cam', 12, 'rgb8')
    np.testing.assert_array_equal(image_to_numpy(decoded), arr)


def test_encode_like_copies_the_header_and_never_aliases_the_array():
    arr = np.full((2, 2), 7, np.uint8)
    header = Header(frame_id='f')
    header.stamp.sec = 3
    raw = encode_like(arr, 'mono8', header)
    arr[:] = 9
    msg = deserialize_message(raw, Image)
    assert (msg.header.stamp.sec, msg.header.frame_id) == (3, 'f')
    assert bytes(msg.data) == bytes([7] * 4)


def test_one_row_views_and_strided_arrays_get_a_tight_step():
    frame = np.arange(10 * 20, dtype=np.uint8).reshape(10, 20)
    for view in (frame[::10], frame[:, ::2], frame[3:4, 5:9]):   # numpy: [::10] is contiguous
        for raw in (encode_image(view, 'mono8'), serialize_message(numpy_to_image(view,
                                                                                  'mono8'))):
            msg = deserialize_message(raw, Image)
            assert msg.step == view.shape[1]
            np.testing.assert_array_equal(image_to_numpy(decode_image(raw)), view)


def test_encode_checks_the_array_like_numpy_to_image():
    with pytest.raises(ImageConversionError, match='bgr8 needs shape'):
        encode_image(np.zeros((2, 2), np.uint8), 'bgr8')
    with pytest.raises(ImageConversionError, match='32FC2 needs dtype float32'):
        encode_image(np.zeros((2, 2, 2), np.float64), '32FC2')
    with pytest.raises(ImageConversionError, match='unknown encoding'):
        encode_image(np.zeros((2, 2), np.uint8), 'yuv422')


def test_smallest_image_size():
    assert len(serialize_message(Image())) == MIN_IMAGE_BYTES
    assert decode_image(serialize_message(Image())).height == 0


def corrupt_cases():
    good = encode_image(np.zeros((4, 5, 3), np.uint8), 'bgr8', 1, 2, 'camera')
    length_at = len(good) - 60 - 4
    too_long = good[:length_at] + (1 << 30).to_bytes(4, 'little') + good[length_at + 4:]
    huge_string = good[:12] + (1 << 31).to_bytes(4, 'little') + good[16:]
    return {
        'truncated': (good[:len(good) // 2], 'corrupted serialized Image'),
        'data length beyond the buffer': (too_long, 'corrupted serialized Image'),
        'frame_id length beyond the buffer': (huge_string, 'corrupted serialized Image'),
        'too short': (good[:20], 'shorter than the smallest possible'),
        'empty': (b'', 'shorter than the smallest possible'),
        'not bytes': ('text', 'expected serialized bytes, got str'),
    }


@pytest.mark.parametrize('case', sorted(corrupt_cases()))
def test_corrupted_bytes_raise_a_conversion_error_naming_the_problem(case):
    raw, text = corrupt_cases()[case]
    with pytest.raises(ImageConversionError, match=text):
        decode_image(raw)
