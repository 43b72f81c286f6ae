"""
Pure ``sensor_msgs/Image`` <-> numpy conversion (a strict, dependency-free cv_bridge core).

Nothing here imports rclpy or a message package at import time.  Messages are duck typed:
anything with ``header, height, width, encoding, is_bigendian, step, data`` works, e.g.
rclpy's ``sensor_msgs.msg.Image`` (``data`` is an ``array.array('B')``) and rosbags'
deserialized dataclasses (``data`` is a numpy uint8 array).

Decoding is strict: ``len(data)`` must equal ``step * height`` exactly (neither a short nor
an over-long buffer is accepted), ``step`` may include row padding but never less than one
row of pixels, and the size is capped so a corrupted header cannot make us allocate
gigabytes.  Every malformed message raises :class:`ImageConversionError`.
"""

import array as stdlib_array
import operator
import sys

import cv2
import numpy as np

MAX_SIDE = 16384
MAX_PIXELS = 2 ** 26

SUPPORTED_ENCODINGS = {
    'bgr8': (np.dtype(np.uint8), 3),
    'rgb8': (np.dtype(np.uint8), 3),
    'bgra8': (np.dtype(np.uint8), 4),
    'rgba8': (np.dtype(np.uint8), 4),
    'mono8': (np.dtype(np.uint8), 1),
    'mono16': (np.dtype(np.uint16), 1),
    '32FC1': (np.dtype(np.float32), 1),
    '32FC2': (np.dtype(np.float32), 2),
}

_TO_BGR = {
    'rgb8': cv2.COLOR_RGB2BGR,
    'bgra8': cv2.COLOR_BGRA2BGR,
    'rgba8': cv2.COLOR_RGBA2BGR,
    'mono8': cv2.COLOR_GRAY2BGR,
}


class ImageConversionError(ValueError):
    """A message or array that cannot be converted; the text names the problem."""


def _lookup(encoding):
    try:
        return SUPPORTED_ENCODINGS[encoding]
    except (KeyError, TypeError):
        supported = ', '.join(SUPPORTED_ENCODINGS)
        raise ImageConversionError(
            f'unknown encoding {encoding!r}; supported: {supported}') from None


def _as_int(value, name):
    try:
        return operator.index(value)
    except TypeError:
        raise ImageConversionError(f'{name}={value!r} is not an integer') from None


def _check_dims(height, width):
    for name, value in (('height', height), ('width', width)):
        if value == 0:
            raise ImageConversionError(f'zero {name}')
        if value < 0:
            raise ImageConversionError(f'negative {name}={value}')
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise ImageConversionError(
            f'height*width {height}x{width} exceeds limit '
            f'({MAX_SIDE} per side, {MAX_PIXELS} pixels)')


def _byte_buffer(data):
    """Return ``data`` as a flat uint8 array, a view wherever the buffer allows."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(f'data has dtype {data.dtype}, expected uint8')
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        pass
    try:  # a plain sequence of ints
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageConversionError(f'data is not a byte buffer: {exc}') from None


def _check_array(array_in, encoding):
    """Validate an (H, W[, C]) array against ``encoding``; return it native and 2-D/3-D."""
    dtype, channels = _lookup(encoding)
    arr = np.asarray(array_in)
    if arr.dtype.newbyteorder('=') != dtype:
        raise ImageConversionError(f'{encoding} needs dtype {dtype}, got {arr.dtype}')
    if channels == 1 and arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    expected = '(H, W)' if channels == 1 else f'(H, W, {channels})'
    if arr.ndim != (2 if channels == 1 else 3) or (channels > 1 and arr.shape[2] != channels):
        raise ImageConversionError(f'{encoding} needs shape {expected}, got {arr.shape}')
    _check_dims(*arr.shape[:2])
    return arr.astype(dtype, copy=False)


def image_to_numpy(msg):
    """
    Decode an Image message to an (H, W) or (H, W, C) array.

    The result is a view over ``msg.data`` whenever the byte order is native (row padding is
    skipped by striding), so it may be read-only and changes with the buffer; copy it before
    mutating.  Multi-byte data in foreign byte order becomes a native-order copy.
    """
    dtype, channels = _lookup(msg.encoding)
    height = _as_int(msg.height, 'height')
    width = _as_int(msg.width, 'width')
    step = _as_int(msg.step, 'step')
    _check_dims(height, width)
    pixel_size = dtype.itemsize * channels
    row_bytes = width * pixel_size
    if step < row_bytes:
        raise ImageConversionError(
            f'step={step} < width*pixel_size={row_bytes} ({width}*{pixel_size})')
    if step % dtype.itemsize:
        raise ImageConversionError(
            f'step={step} is not a multiple of the element size {dtype.itemsize} '
            f'of {msg.encoding}')
    buf = _byte_buffer(msg.data)
    if buf.size != step * height:
        raise ImageConversionError(
            f'len(data)={buf.size} != step*height={step * height} ({step}*{height})')
    rows = buf.reshape(height, step)[:, :row_bytes]
    wire = dtype.newbyteorder('>' if msg.is_bigendian else '<')
    shape = (height, width) if channels == 1 else (height, width, channels)
    arr = rows.view(wire).reshape(shape)
    return arr.astype(dtype, copy=False)


def numpy_to_image(array, encoding, header=None, msg=None):
    """
    Build an Image message from an array (native byte order, ``step = width*pixel_size``).

    ``msg`` defaults to a new ``sensor_msgs.msg.Image`` (imported lazily); a message whose
    ``data`` is a numpy array (rosbags style) gets a numpy uint8 buffer, otherwise an
    ``array.array('B')``.  The data is always a copy, never aliasing ``array``.
    """
    arr = np.ascontiguousarray(_check_array(array, encoding))
    height, width = arr.shape[:2]
    if msg is None:
        from sensor_msgs.msg import Image
        msg = Image()
    if header is not None:
        msg.header = header
    flat = arr.reshape(-1).view(np.uint8)
    if isinstance(getattr(msg, 'data', None), np.ndarray):
        data = flat.copy()
    else:
        data = stdlib_array.array('B')
        data.frombytes(flat)
    msg.height = int(height)
    msg.width = int(width)
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == 'big')
    msg.step = int(arr.nbytes // height)   # not strides[0]: a one-row view may be longer
    msg.data = data
    return msg


def to_bgr8(msg_or_array, encoding=None):
    """
    Convert a colour or mono8 message/array to a new contiguous, writeable (H, W, 3) uint8 BGR.

    For a message ``encoding`` defaults to ``msg.encoding``; an array needs it.  mono16 and
    float encodings raise :class:`ImageConversionError`.
    """
    if isinstance(msg_or_array, np.ndarray):
        if encoding is None:
            raise ImageConversionError('an array needs an explicit encoding')
        arr = _check_array(msg_or_array, encoding)
    else:
        if encoding is not None and encoding != msg_or_array.encoding:
            raise ImageConversionError(
                f'encoding {encoding!r} does not match msg.encoding '
                f'{msg_or_array.encoding!r}')
        encoding = msg_or_array.encoding
        arr = image_to_numpy(msg_or_array)
    if encoding == 'bgr8':
        return np.array(arr, order='C', copy=True)
    if encoding not in _TO_BGR:
        _lookup(encoding)
        raise ImageConversionError(f'cannot convert {encoding} to bgr8')
    return cv2.cvtColor(np.ascontiguousarray(arr), _TO_BGR[encoding])
