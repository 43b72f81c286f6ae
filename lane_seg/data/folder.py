"""
The package's own folder layout: a writer, the camera file and lane / flow datasets.

Layout under ``root`` (NNNNNN is a 6-digit zero-padded frame index)::

    images/NNNNNN.png      BGR frames
    masks/NNNNNN.png       uint8 lane-boundary labels (0 background, 1..N instance ids)
    markings/NNNNNN.png    optional painted-marking mask (255 = paint)
    flow/NNNNNN.flo        flow from frame NNNNNN to the next frame
    flow_valid/NNNNNN.png  optional flow validity (255 = valid)
    camera.yaml            {width, height, fx, fy, cx, cy} plus optional extra keys
"""

import operator
import os
from pathlib import Path
import re

import cv2
import numpy as np
import yaml

from .errors import check_size
from .errors import DatasetError
from .errors import read_flow_file
from .errors import read_image
from .errors import read_mask
from .errors import require_items
from ..flow.io import FlowIOError
from ..flow.io import write_flo

CAMERA_FILE = 'camera.yaml'
CAMERA_KEYS = ('width', 'height', 'fx', 'fy', 'cx', 'cy')
UNKNOWN_FLOW = 1e9


def frame_name(index):
    """Return the zero-padded file stem of frame ``index`` ('000042')."""
    index = operator.index(index)
    if index < 0:
        raise ValueError(f'frame index must be non-negative, got {index}')
    return f'{index:06d}'


def mask_binary(mask):
    """Collapse instance ids to a 0/1 uint8 lane mask."""
    return (np.asarray(mask) > 0).astype(np.uint8)


def flow_valid_default(flow):
    """Return the pixels whose flow is finite and below the Middlebury unknown value."""
    return (np.isfinite(flow) & (np.abs(flow) < UNKNOWN_FLOW)).all(axis=2)


def _indexed(directory, suffix):
    """Map frame index to path for the ``NNNNNN<suffix>`` files in ``directory``."""
    pattern = re.compile(r'(\d{6,})' + re.escape(suffix))
    if not directory.is_dir():
        return {}
    found = {}
    for entry in directory.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def _plain(value):
    """Turn numpy scalars and arrays into plain Python values that YAML can dump."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _checked_camera(path, camera):
    if not isinstance(camera, dict):
        raise DatasetError(path, f'camera must be a mapping, got {type(camera).__name__}')
    missing = [key for key in CAMERA_KEYS if key not in camera]
    if missing:
        raise DatasetError(path, f'missing camera keys: {", ".join(missing)}')
    checked = dict(camera)
    for key in CAMERA_KEYS:
        value = _plain(camera[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not np.isfinite(value):
            raise DatasetError(path, f'camera {key} must be a finite number, got {value!r}')
        checked[key] = float(value)
    for key in ('width', 'height'):
        if checked[key] <= 0 or checked[key] != int(checked[key]):
            raise DatasetError(path, f'camera {key} must be a positive integer')
        checked[key] = int(checked[key])
    return checked


def read_camera(root):
    """Read and validate ``root/camera.yaml``; return the dict with numeric intrinsics."""
    path = Path(root) / CAMERA_FILE
    try:
        camera = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DatasetError(path, f'cannot read: {exc.strerror or exc}') from exc
    except yaml.YAMLError as exc:
        raise DatasetError(path, f'malformed YAML: {exc}') from exc
    return _checked_camera(path, camera)


class FolderWriter:
    """Write frames, labels, flow and the camera file in the folder layout."""

    def __init__(self, root):
        self.root = Path(root)

    def write_camera(self, camera):
        """Validate and write ``camera.yaml``; return its path."""
        path = self.root / CAMERA_FILE
        text = yaml.safe_dump(_plain(_checked_camera(path, camera)), sort_keys=False)
        self._replace(path, lambda tmp: tmp.write_text(text))
        return path

    def write(self, index, image=None, mask=None, markings=None, flow=None, flow_valid=None):
        """Write whichever of the frame's arrays are given; return the paths written."""
        name = frame_name(index)
        pngs = [('images', image, None), ('masks', mask, 1), ('markings', markings, 255),
                ('flow_valid', flow_valid, 255)]
        written = []
        for folder, array, bool_value in pngs:
            if array is not None:
                path = self.root / folder / f'{name}.png'
                written.append(self._png(path, _label_array(path, array, bool_value)))
        if flow is not None:
            path = self.root / 'flow' / f'{name}.flo'
            try:
                self._replace(path, lambda tmp: write_flo(tmp, flow))
            except FlowIOError as exc:
                raise DatasetError(path, exc.problem) from exc
            written.append(path)
        return written

    def _png(self, path, array):
        try:
            ok, encoded = cv2.imencode('.png', array)
        except cv2.error as exc:
            raise DatasetError(path, f'cannot encode PNG: {exc}') from exc
        if not ok:
            raise DatasetError(path, 'cannot encode PNG')
        self._replace(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))
        return path

    @staticmethod
    def _replace(path, write):
        """Write through a temporary file then rename it, so readers never see half a file."""
        tmp = path.with_name(f'.{path.name}.tmp')
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise DatasetError(path, f'cannot write: {exc.strerror or exc}') from exc
        finally:
            if tmp.exists():
                tmp.unlink()


def _label_array(path, array, bool_value):
    """Check an image or label array; bools become 0 / ``bool_value`` uint8."""
    array = np.asarray(array)
    if array.dtype == bool and bool_value is not None:
        array = array.astype(np.uint8) * np.uint8(bool_value)
    if array.dtype != np.uint8:
        raise DatasetError(path, f'expected a uint8 array, got {array.dtype}')
    colour_ok = bool_value is None and array.ndim == 3 and array.shape[2] == 3
    if array.ndim != 2 and not colour_ok:
        raise DatasetError(path, f'unexpected array shape {array.shape}')
    return array


class LaneFolderDataset:
    """
    Image / lane-mask pairs from ``images/`` and ``masks/``.

    Items are dicts ``image`` (BGR uint8), ``mask`` (uint8; 0/1 when ``binary``), ``name``
    and, when ``markings/NNNNNN.png`` exists, ``markings``.  Images without a mask are
    listed in ``skipped`` as (path, reason); unreadable files raise DatasetError on access.
    """

    def __init__(self, root, binary=False):
        self.root = Path(root)
        self.binary = binary
        self.items = []
        self.skipped = []
        masks = _indexed(self.root / 'masks', '.png')
        for index, image_path in _indexed(self.root / 'images', '.png').items():
            if index in masks:
                self.items.append((frame_name(index), image_path, masks[index]))
            else:
                mask_path = self.root / 'masks' / image_path.name
                self.skipped.append((str(image_path), f'no mask {mask_path}'))
        require_items(self.root / 'images', self.items, self.skipped)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, image_path, mask_path = self.items[i]
        image = read_image(image_path)
        mask = read_mask(mask_path, image.shape)
        item = {'image': image, 'mask': mask_binary(mask) if self.binary else mask,
                'name': name}
        markings_path = self.root / 'markings' / f'{name}.png'
        if markings_path.is_file():
            item['markings'] = read_mask(markings_path, image.shape)
        return item


class FlowFolderDataset:
    """
    Frame pairs (K, K+1) with the flow ``flow/K.flo`` between them.

    Items are dicts ``image1``, ``image2`` (BGR uint8), ``flow`` (float32 (H, W, 2)),
    ``valid`` (bool (H, W); from ``flow_valid/K.png`` when present, else finite flow) and
    ``name``.  Flow files whose images are missing are listed in ``skipped``.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.items = []
        self.skipped = []
        images = _indexed(self.root / 'images', '.png')
        for index, flow_path in _indexed(self.root / 'flow', '.flo').items():
            missing = [str(self.root / 'images' / f'{frame_name(k)}.png')
                       for k in (index, index + 1) if k not in images]
            if missing:
                self.skipped.append((str(flow_path), f'missing {", ".join(missing)}'))
            else:
                self.items.append(
                    (frame_name(index), images[index], images[index + 1], flow_path))
        require_items(self.root / 'flow', self.items, self.skipped)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, first, second, flow_path = self.items[i]
        image1 = read_image(first)
        image2 = check_size(second, read_image(second), image1.shape)
        flow = check_size(flow_path, read_flow_file(flow_path), image1.shape)
        valid_path = self.root / 'flow_valid' / f'{name}.png'
        if valid_path.is_file():
            valid = read_mask(valid_path, image1.shape) > 0
        else:
            valid = flow_valid_default(flow)
        return {'image1': image1, 'image2': image2, 'flow': flow, 'valid': valid,
                'name': name}
