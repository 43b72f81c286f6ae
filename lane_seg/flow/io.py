"""Optical-flow files: Middlebury ``.flo`` and KITTI 16-bit PNG."""  # noqa: A005

import os

import cv2
import numpy as np

FLO_MAGIC = 202021.25
FLO_TAG = b'PIEH'  # the magic float's little-endian bytes
FLO_MAX_DIM = 1 << 16
KITTI_OFFSET = 2 ** 15
KITTI_SCALE = 64.0
KITTI_MIN = -KITTI_OFFSET / KITTI_SCALE
KITTI_MAX = (2 ** 16 - 1 - KITTI_OFFSET) / KITTI_SCALE


class FlowIOError(ValueError):
    """A flow file that cannot be read or written; the message names the file."""

    def __init__(self, path, problem):
        super().__init__(f'{os.fspath(path)}: {problem}')
        self.path = os.fspath(path)
        self.problem = problem


def _check_flow(path, flow):
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.shape[0] < 1 or flow.shape[1] < 1:
        raise FlowIOError(path, f'flow must have shape (H, W, 2), got {flow.shape}')
    return flow


def read_flo(path):
    """Read a Middlebury ``.flo`` file into a float32 (H, W, 2) array of (u, v)."""
    try:
        with open(path, 'rb') as f:
            header = f.read(12)
            if len(header) < 12:
                raise FlowIOError(path, f'truncated header ({len(header)} of 12 bytes)')
            magic = np.frombuffer(header, '<f4', 1)[0]
            if magic != np.float32(FLO_MAGIC):
                raise FlowIOError(
                    path, f'bad magic {header[:4]!r}, expected {FLO_TAG!r} ({FLO_MAGIC})')
            width, height = (int(x) for x in np.frombuffer(header, '<i4', 2, 4))
            if not (0 < width <= FLO_MAX_DIM and 0 < height <= FLO_MAX_DIM):
                raise FlowIOError(path, f'absurd size {width}x{height}')
            count = 2 * width * height
            size = os.fstat(f.fileno()).st_size
            if size != 12 + 4 * count:
                problem = 'truncated' if size < 12 + 4 * count else 'trailing bytes'
                raise FlowIOError(
                    path, f'{problem}: {size} bytes, expected {12 + 4 * count} '
                    f'for {width}x{height}')
            data = f.read(4 * count)
    except OSError as exc:
        raise FlowIOError(path, f'cannot read: {exc.strerror or exc}') from exc
    if len(data) != 4 * count:
        raise FlowIOError(path, f'truncated while reading ({len(data)} of {4 * count} bytes)')
    return np.frombuffer(data, '<f4', count).reshape(height, width, 2).astype(np.float32)


def write_flo(path, flow):
    """Write a (H, W, 2) flow array as a Middlebury ``.flo`` file."""
    flow = _check_flow(path, flow)
    height, width = flow.shape[:2]
    if width > FLO_MAX_DIM or height > FLO_MAX_DIM:
        raise FlowIOError(path, f'absurd size {width}x{height}')
    header = np.float32(FLO_MAGIC).astype('<f4').tobytes()
    header += np.array([width, height], '<i4').tobytes()
    try:
        with open(path, 'wb') as f:
            f.write(header)
            f.write(np.ascontiguousarray(flow, '<f4').tobytes())
    except OSError as exc:
        raise FlowIOError(path, f'cannot write: {exc.strerror or exc}') from exc


def read_kitti_flow(path):
    """Read a KITTI flow PNG; return (flow float32 (H, W, 2), valid bool (H, W))."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise FlowIOError(path, f'cannot read: {exc.strerror or exc}') from exc
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise FlowIOError(path, 'not a decodable PNG')
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[2] != 3:
        raise FlowIOError(
            path, f'expected a 3-channel 16-bit PNG, got {image.dtype} {image.shape}')
    rgb = image[..., ::-1].astype(np.float32)  # cv2 decodes to BGR; KITTI stores (u, v, valid)
    flow = (rgb[..., :2] - KITTI_OFFSET) / KITTI_SCALE
    return flow, image[..., 0] > 0


def write_kitti_flow(path, flow, valid=None):
    """
    Write flow as a KITTI 16-bit PNG, clipping to the representable range.

    ``valid`` defaults to every pixel whose flow is finite; invalid pixels store zero flow.
    """
    flow = _check_flow(path, flow).astype(np.float64)
    if not os.fspath(path).lower().endswith('.png'):
        raise FlowIOError(path, 'KITTI flow must be written to a .png file')
    finite = np.isfinite(flow).all(axis=2)
    valid = finite if valid is None else np.asarray(valid, bool) & finite
    if valid.shape != flow.shape[:2]:
        raise FlowIOError(path, f'valid shape {valid.shape} does not match flow {flow.shape}')
    flow = np.where(valid[..., None], flow, 0.0)
    encoded = np.clip(np.rint(flow * KITTI_SCALE + KITTI_OFFSET), 0, 2 ** 16 - 1)
    bgr = np.dstack([valid, encoded[..., 1], encoded[..., 0]]).astype(np.uint16)
    try:
        ok = cv2.imwrite(os.fspath(path), bgr)
    except cv2.error as exc:
        raise FlowIOError(path, f'cannot write: {exc}') from exc
    if not ok:
        raise FlowIOError(path, 'cannot write: cv2.imwrite failed')
