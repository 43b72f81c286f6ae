"""CULane: list files, label PNGs and ``.lines.txt`` lane annotations."""

from pathlib import Path

import cv2
import numpy as np

from .errors import DatasetError
from .errors import read_image
from .errors import read_mask
from .errors import require_items


def draw_lanes(lanes, shape, line_width):
    """Draw each lane's (N, 2) x, y points as a polyline with value 1, 2, ... in a uint8 mask."""
    mask = np.zeros(shape[:2], np.uint8)
    for lane_id, points in enumerate(lanes, 1):
        points = np.rint(np.asarray(points, np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [points], False, min(lane_id, 255), thickness=int(line_width))
    return mask


def read_lines_txt(path):
    """Read a CULane ``.lines.txt``: one lane a line as ``x y x y ...``; return (N, 2) arrays."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f'cannot read: {exc}') from exc
    lanes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            values = np.array(line.split(), np.float64)
        except ValueError as exc:
            raise DatasetError(path, f'line {lineno}: not numbers ({exc})') from exc
        if values.size % 2 or not np.isfinite(values).all():
            raise DatasetError(path, f'line {lineno}: expected finite x y pairs')
        if values.size:
            lanes.append(values.reshape(-1, 2))
    return lanes


def _resolve(root, path):
    """Resolve a list-file path: absolute, relative to ``root``, or relative to the cwd."""
    path = Path(path)
    if path.is_absolute() or not (root / path).exists():
        return path
    return root / path


class CULaneDataset:
    """
    CULane images with lane-id masks (0 background, 1..4 lanes).

    Each list line is ``/image.jpg [/label.png] [e1 e2 e3 e4]`` with paths relative to
    ``root``.  The label PNG is used when it exists, else the mask is drawn from the
    ``.lines.txt`` beside the image (lanes numbered in file order, ``line_width`` thick).
    Items are dicts ``image``, ``mask``, ``name`` and, when the line has them, ``exist``
    (uint8 lane-existence flags).  Unusable lines are listed in ``skipped``.
    """

    def __init__(self, root, list_file='list/train_gt.txt', line_width=16):
        self.root = Path(root)
        self.list_file = _resolve(self.root, list_file)
        self.line_width = int(line_width)
        self.items = []
        self.skipped = []
        try:
            lines = self.list_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(self.list_file, f'cannot read list file: {exc}') from exc
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                self._add(line.split(), f'{self.list_file}:{lineno}')
        require_items(self.list_file, self.items, self.skipped)

    def _add(self, tokens, where):
        image, rest = tokens[0], tokens[1:]
        label = rest.pop(0) if rest and not rest[0].isdigit() else None
        if not all(token.isdigit() for token in rest):
            self.skipped.append((where, 'malformed list line'))
            return
        image_path = self.root / image.lstrip('/')
        label_path = self.root / label.lstrip('/') if label else None
        lines_path = image_path.with_suffix('.lines.txt')
        if not image_path.is_file():
            self.skipped.append((str(image_path), f'image not found ({where})'))
        elif label_path is not None and label_path.is_file():
            self.items.append((image.lstrip('/'), image_path, label_path, rest))
        elif lines_path.is_file():
            self.items.append((image.lstrip('/'), image_path, lines_path, rest))
        else:
            self.skipped.append((str(image_path), f'no label PNG or .lines.txt ({where})'))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, image_path, label_path, exist = self.items[i]
        image = read_image(image_path)
        if label_path.suffix == '.png':
            mask = read_mask(label_path, image.shape)
        else:
            mask = draw_lanes(read_lines_txt(label_path), image.shape, self.line_width)
        item = {'image': image, 'mask': mask, 'name': name}
        if exist:
            item['exist'] = np.array([int(flag) for flag in exist], np.uint8)
        return item
