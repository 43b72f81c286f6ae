"""TuSimple lane benchmark: JSON-lines labels with lanes sampled at fixed rows."""

import glob
import json
import os
from pathlib import Path

import numpy as np

from .culane import draw_lanes
from .errors import DatasetError
from .errors import read_image
from .errors import require_items


def parse_record(line):
    """Parse one label line; return (raw_file, list of (N, 2) int points per drawn lane)."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError('record is not a JSON object')
    lanes, rows, raw_file = record.get('lanes'), record.get('h_samples'), record.get('raw_file')
    if not isinstance(raw_file, str) or not isinstance(rows, list) \
            or not isinstance(lanes, list):
        raise ValueError('record needs lanes, h_samples and raw_file')
    points = []
    for lane in lanes:
        if not isinstance(lane, list) or len(lane) != len(rows):
            raise ValueError('lane length does not match h_samples')
        xy = np.array([(x, y) for x, y in zip(lane, rows)], np.float64).reshape(-1, 2)
        xy = xy[xy[:, 0] >= 0]
        if len(xy):
            points.append(xy)
    return raw_file, points


class TuSimpleDataset:
    """
    TuSimple images with masks whose lanes are polylines of ids 1..N.

    ``label_files`` are names or glob patterns relative to ``root`` (default
    ``label_data_*.json``, else ``test_label.json``).  Lanes are drawn through their valid
    points (x >= 0), in label order, ``line_width`` thick; lanes with no valid point get no
    id.  Corrupt lines and missing images are listed in ``skipped`` as (file:line, reason).
    """

    def __init__(self, root, label_files=None, line_width=5):
        self.root = Path(root)
        self.line_width = int(line_width)
        self.label_files = self._label_paths(label_files)
        self.items = []
        self.skipped = []
        for path in self.label_files:
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                self.skipped.append((str(path), f'cannot read: {exc}'))
                continue
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    self._add(line, f'{path}:{lineno}')
        require_items(self.root, self.items, self.skipped)

    def _label_paths(self, label_files):
        if label_files is None:
            found = sorted(self.root.glob('label_data_*.json'))
            return found or [self.root / 'test_label.json']
        if isinstance(label_files, (str, os.PathLike)):
            label_files = [label_files]
        paths = []
        for name in label_files:
            path = self.root / name
            if any(char in str(name) for char in '*?['):
                paths.extend(sorted(Path(p) for p in glob.glob(str(path))))
            else:
                paths.append(path)
        if not paths:
            raise DatasetError(self.root, f'no label files match {list(label_files)}')
        return paths

    def _add(self, line, where):
        try:
            raw_file, lanes = parse_record(line)
        except (ValueError, TypeError) as exc:
            self.skipped.append((where, f'corrupt label: {exc}'))
            return
        image_path = self.root / raw_file.lstrip('/')
        if image_path.is_file():
            self.items.append((raw_file, image_path, lanes))
        else:
            self.skipped.append((where, f'image not found: {image_path}'))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, image_path, lanes = self.items[i]
        image = read_image(image_path)
        return {'image': image, 'mask': draw_lanes(lanes, image.shape, self.line_width),
                'name': name}
