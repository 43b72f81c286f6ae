"""KITTI optical flow (2012 / 2015): frame pairs with 16-bit PNG ground truth."""

from pathlib import Path
import re

from .errors import check_size
from .errors import DatasetError
from .errors import read_image
from .errors import require_items
from ..flow.io import FlowIOError
from ..flow.io import read_kitti_flow

FIRST_FRAME = re.compile(r'(\d{6})_10\.png')


def _first_dir(base, names):
    """Return the first existing directory ``base/name``, else ``base/names[0]``."""
    for name in names:
        if (base / name).is_dir():
            return base / name
    return base / names[0]


class KittiFlowDataset:
    """
    KITTI ``image_2/NNNNNN_10.png`` / ``_11.png`` pairs with ``flow_occ`` ground truth.

    ``root`` is the KITTI folder holding ``split`` (or the split folder itself).  Images come
    from ``image_2`` (2015) or ``colored_0`` (2012); flow from ``flow_dir``, by default
    ``flow_occ`` or else ``flow_noc``.  Items are dicts like FlowFolderDataset's.
    """

    def __init__(self, root, split='training', flow_dir=None):
        self.root = Path(root)
        base = self.root / split if (self.root / split).is_dir() else self.root
        self.image_dir = _first_dir(base, ('image_2', 'colored_0'))
        self.flow_dir = base / flow_dir if flow_dir else _first_dir(base, ('flow_occ', 'flow_noc'))
        self.items = []
        self.skipped = []
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, 'image directory not found')
        for first in sorted(self.image_dir.iterdir()):
            match = FIRST_FRAME.fullmatch(first.name)
            if not match:
                continue
            second = self.image_dir / f'{match.group(1)}_11.png'
            flow = self.flow_dir / first.name
            missing = [str(path) for path in (second, flow) if not path.is_file()]
            if missing:
                self.skipped.append((str(first), f'missing {", ".join(missing)}'))
            else:
                self.items.append((first.stem, first, second, flow))
        require_items(self.image_dir, self.items, self.skipped)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, first, second, flow_path = self.items[i]
        image1 = read_image(first)
        image2 = check_size(second, read_image(second), image1.shape)
        try:
            flow, valid = read_kitti_flow(flow_path)
        except FlowIOError as exc:
            raise DatasetError(flow_path, exc.problem) from exc
        check_size(flow_path, flow, image1.shape)
        return {'image1': image1, 'image2': image2, 'flow': flow, 'valid': valid,
                'name': name}
