"""
CARLA support: pure ground-truth conversions and an optional camera client node.

:mod:`lane_seg.carla.conversions` is pure numpy (no ``carla``, no rclpy) and is what the rest
of the package imports. :mod:`lane_seg.carla.client_node` is the ROS 2 node that talks to a
CARLA server through the optional ``carla`` client package (``pip install carla==<server
version>``), imported only when the node connects.
"""

from .conversions import (
    carla_flow_to_pixels,
    flow_convention,
    FLOW_CONVENTIONS,
    FlowConvention,
    palette_to_lane_mask,
    parse_carla_version,
    ROAD_LINE_RGB,
    ROAD_LINE_TAG,
    road_line_tag,
    ROAD_LINE_TAG_LEGACY,
    semantic_raw_to_lane_mask,
    server_supports_optical_flow,
)

__all__ = [
    'carla_flow_to_pixels',
    'flow_convention',
    'FLOW_CONVENTIONS',
    'FlowConvention',
    'palette_to_lane_mask',
    'parse_carla_version',
    'road_line_tag',
    'ROAD_LINE_RGB',
    'ROAD_LINE_TAG',
    'ROAD_LINE_TAG_LEGACY',
    'semantic_raw_to_lane_mask',
    'server_supports_optical_flow',
]
