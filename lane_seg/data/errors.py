"""The dataset error and the checked readers every dataset shares."""

import os

import cv2
import numpy as np

from ..flow.io import FlowIOError
from ..flow.io import read_flo


class DatasetError(ValueError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""

    def __init__(self, path, problem):
        super().__init__(f'{os.fspath(path)}: {problem}')
        self.path = os.fspath(path)
        self.problem = problem


def read_image(path, flags=cv2.IMREAD_COLOR):
    """Decode an image file with ``cv2.imdecode``; raise DatasetError when that fails."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise DatasetError(path, f'cannot read: {exc.strerror or exc}') from exc
    if raw.size == 0:
        raise DatasetError(path, 'empty file')
    try:
        image = cv2.imdecode(raw, flags)
    except cv2.error as exc:
        raise DatasetError(path, f'cannot decode image: {exc}') from exc
    if image is None:
        raise DatasetError(path, 'corrupt or unsupported image')
    return image


def read_mask(path, shape=None):
    """Read an 8-bit single-channel label image, optionally checking its (H, W)."""
    mask = read_image(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            raise DatasetError(path, 'mask has differing colour channels')
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        raise DatasetError(path, f'mask must be 8-bit, got {mask.dtype}')
    return mask if shape is None else check_size(path, mask, shape)


def read_flow_file(path):
    """Read a ``.flo`` file, reporting problems as DatasetError."""
    try:
        return read_flo(path)
    except FlowIOError as exc:
        raise DatasetError(path, exc.problem) from exc


def check_size(path, array, shape):
    """Raise DatasetError unless ``array`` has the (H, W) of ``shape``."""
    if array.shape[:2] != tuple(shape[:2]):
        raise DatasetError(path, f'size {array.shape[:2]} does not match {tuple(shape[:2])}')
    return array


def require_items(path, items, skipped):
    """Raise DatasetError naming ``path`` when a dataset found nothing usable."""
    if not items:
        raise DatasetError(path, f'no usable samples ({len(skipped)} skipped: {skipped[:3]})')
