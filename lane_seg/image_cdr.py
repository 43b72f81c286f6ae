"""
``sensor_msgs/Image`` as serialized CDR bytes, for the nodes' raw subscriptions and publishers.

rclpy turns a 1.9 MB camera frame into a Python message (and back) by copying it element
buffer to element buffer while holding the GIL: about 0.9 ms each way for an 800x600
``bgra8`` frame on this project's 2-core machine, plus 1.5 ms to fill ``array.array`` data
for every image a node publishes. A node whose executor thread and worker share the GIL pays
that as waiting time on every frame. Here a frame is one ``bytes`` object on the wire side:

* :func:`decode_image` turns the bytes of a raw subscription into a rosbags ``Image``
  dataclass (numpy ``data``), which :func:`lane_seg.image_conversion.image_to_numpy` decodes
  like any other message; a truncated or corrupted buffer raises
  :class:`~lane_seg.image_conversion.ImageConversionError` naming the problem.
* :func:`encode_image` builds the CDR bytes of an Image from an array with one copy of the
  pixels; rclpy's ``Publisher.publish`` sends ``bytes`` as they are.

The CDR layout (encapsulation header, string and sequence alignment) comes from rosbags'
serializer: the pixel sequence is the message's last field, so the header and the fixed
fields are serialized by rosbags with empty data and only the sequence's length and bytes
are appended. No rclpy import; tested against rclpy's own (de)serialization.
"""

from functools import lru_cache
import struct
import sys

import numpy as np
from rosbags.typesys import get_typestore, Stores

from .image_conversion import _check_array, ImageConversionError

IMAGE_TYPE = 'sensor_msgs/msg/Image'
# The smallest Image, all fields zero or empty: 4 bytes of encapsulation header, 40 of CDR.
MIN_IMAGE_BYTES = 44


@lru_cache(maxsize=1)
def _store():
    return get_typestore(Stores.ROS2_KILTED)


def _types():
    types = _store().types
    return (types[IMAGE_TYPE], types['std_msgs/msg/Header'],
            types['builtin_interfaces/msg/Time'])


def decode_image(raw):
    """
    Deserialize the CDR bytes of a ``sensor_msgs/Image`` into a rosbags dataclass.

    ``raw`` is what a raw rclpy subscription hands its callback. The message's fields are not
    checked beyond the CDR layout: :func:`image_to_numpy` checks the image itself.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ImageConversionError(f'expected serialized bytes, got {type(raw).__name__}')
    size = len(raw)
    if size < MIN_IMAGE_BYTES:
        raise ImageConversionError(f'serialized Image of {size} bytes is shorter than the '
                                   f'smallest possible ({MIN_IMAGE_BYTES})')
    try:
        return _store().deserialize_cdr(raw, IMAGE_TYPE)
    except Exception as exc:  # SerdeError, struct.error, UnicodeDecodeError, IndexError...
        raise ImageConversionError(f'corrupted serialized Image ({size} bytes): '
                                   f'{type(exc).__name__}: {exc}') from None


def encode_image(array, encoding, stamp_sec=0, stamp_nanosec=0, frame_id=''):
    """
    Serialize an (H, W[, C]) array as a little-endian CDR ``sensor_msgs/Image``.

    The same checks as :func:`numpy_to_image` (dtype and shape for ``encoding``); ``step`` is
    ``width * pixel size``. Returns ``bytes`` for ``Publisher.publish``.
    """
    arr = np.ascontiguousarray(_check_array(array, encoding))
    if sys.byteorder != 'little':
        arr = arr.astype(arr.dtype.newbyteorder('<'))
    image_cls, header_cls, time_cls = _types()
    height, width = arr.shape[:2]
    header = header_cls(stamp=time_cls(sec=int(stamp_sec), nanosec=int(stamp_nanosec)),
                        frame_id=str(frame_id))
    # Not strides[0]: numpy calls a one-row view with a longer stride contiguous too.
    step = arr.nbytes // height
    empty = image_cls(header=header, height=int(height), width=int(width), encoding=encoding,
                      is_bigendian=0, step=int(step), data=np.empty(0, np.uint8))
    head = _store().serialize_cdr(empty, IMAGE_TYPE, little_endian=True)   # ends: length 0
    pixels = arr.reshape(-1).view(np.uint8)
    return b''.join((head[:-4], struct.pack('<I', pixels.size), pixels))


def encode_like(array, encoding, header):
    """:func:`encode_image` with the stamp and frame_id of a message ``header``."""
    return encode_image(array, encoding, header.stamp.sec, header.stamp.nanosec,
                        header.frame_id)
