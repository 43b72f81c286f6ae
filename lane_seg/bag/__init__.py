"""
rosbag2 record, replay and evaluation for lane_seg (``lane-seg bag ...``).

``io`` is pure (rosbags + numpy); ``play`` and ``record`` import rclpy lazily, when they run.
"""

from .io import (BagError, BagMessage, BagReader, BagWriter, DecodeError, TopicInfo,
                 typestore)

__all__ = ['BagError', 'BagMessage', 'BagReader', 'BagWriter', 'DecodeError', 'TopicInfo',
           'typestore']
