"""Datasets on disk: the package's folder layout, CULane, TuSimple and KITTI flow."""

from .culane import CULaneDataset
from .errors import DatasetError
from .folder import FlowFolderDataset
from .folder import FolderWriter
from .folder import LaneFolderDataset
from .folder import mask_binary
from .folder import read_camera
from .kitti import KittiFlowDataset
from .tusimple import TuSimpleDataset

LANE_FORMATS = {
    'folder': LaneFolderDataset,
    'culane': CULaneDataset,
    'tusimple': TuSimpleDataset,
}
FLOW_FORMATS = {
    'folder': FlowFolderDataset,
    'kitti': KittiFlowDataset,
}


def _open(formats, kind, path, fmt, kwargs):
    try:
        cls = formats[fmt]
    except KeyError:
        raise ValueError(
            f'unknown {kind} dataset format {fmt!r}; choose from {sorted(formats)}') from None
    return cls(path, **kwargs)


def open_lane_dataset(path, fmt='folder', **kwargs):
    """Open a lane dataset: fmt is 'folder', 'culane' or 'tusimple'; kwargs go to the class."""
    return _open(LANE_FORMATS, 'lane', path, fmt, kwargs)


def open_flow_dataset(path, fmt='folder', **kwargs):
    """Open a flow dataset: fmt is 'folder' or 'kitti'; kwargs go to the class."""
    return _open(FLOW_FORMATS, 'flow', path, fmt, kwargs)


__all__ = [
    'CULaneDataset', 'DatasetError', 'FLOW_FORMATS', 'FlowFolderDataset', 'FolderWriter',
    'KittiFlowDataset', 'LANE_FORMATS', 'LaneFolderDataset', 'TuSimpleDataset', 'mask_binary',
    'open_flow_dataset', 'open_lane_dataset', 'read_camera',
]
