"""CARLA-like synthetic drive with exact lane and optical-flow ground truth (numpy + OpenCV)."""

from .camera import CameraConfig, Intrinsics
from .drive import DriveConfig, Frame, frames_per_second, SyntheticDrive
from .world import WEATHERS, WorldConfig

__all__ = ['CameraConfig', 'DriveConfig', 'Frame', 'Intrinsics', 'SyntheticDrive',
           'WEATHERS', 'WorldConfig', 'frames_per_second']
