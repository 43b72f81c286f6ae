"""lane_seg: int8 lane segmentation and quantized optical flow for ROS 2."""

__version__ = '0.1.0'
