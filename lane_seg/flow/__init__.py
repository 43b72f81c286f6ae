"""Optical-flow file formats and visualisation (pure numpy / OpenCV)."""

from .io import FlowIOError
from .io import read_flo
from .io import read_kitti_flow
from .io import write_flo
from .io import write_kitti_flow
from .viz import color_wheel_legend
from .viz import flow_to_color

__all__ = [
    'FlowIOError', 'color_wheel_legend', 'flow_to_color', 'read_flo', 'read_kitti_flow',
    'write_flo', 'write_kitti_flow',
]
