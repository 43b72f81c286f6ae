"""Pinhole camera model of the synthetic drive (CARLA's RGB camera conventions)."""

from dataclasses import dataclass
import math

import numpy as np

# Camera axes (OpenCV: x right, y down, z forward) expressed in the car frame (x forward,
# y left, z up): a camera-frame vector v maps to CAM_TO_CAR @ v.
CAM_TO_CAR = np.array([[0.0, 0.0, 1.0],
                       [-1.0, 0.0, 0.0],
                       [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class CameraConfig:
    """Where the camera sits and what it sees; defaults are CARLA's front RGB camera."""

    width: int = 800
    height: int = 600
    fov_deg: float = 90.0
    mount_height: float = 1.6
    mount_forward: float = 0.0
    pitch_deg: float = -5.0

    def __post_init__(self):
        if self.width < 8 or self.height < 8:
            raise ValueError(f'camera size {self.width}x{self.height} is too small (min 8x8)')
        if not 10.0 <= self.fov_deg <= 170.0:
            raise ValueError(f'fov_deg={self.fov_deg} outside [10, 170]')
        if self.mount_height <= 0.2:
            raise ValueError(f'mount_height={self.mount_height} m must be > 0.2 m')


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics, pixel centres at integer coordinates (CARLA: cx = W/2)."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_config(cls, cfg: CameraConfig) -> 'Intrinsics':
        f = cfg.width / (2.0 * math.tan(math.radians(cfg.fov_deg) / 2.0))
        return cls(cfg.width, cfg.height, f, f, cfg.width / 2.0, cfg.height / 2.0)

    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def as_dict(self) -> dict:
        return {'width': self.width, 'height': self.height, 'fx': self.fx, 'fy': self.fy,
                'cx': self.cx, 'cy': self.cy}

    def rays(self) -> np.ndarray:
        """Camera-frame ray per pixel with z = 1, so the ray parameter is the z depth."""
        u = (np.arange(self.width, dtype=np.float64) - self.cx) / self.fx
        v = (np.arange(self.height, dtype=np.float64) - self.cy) / self.fy
        rays = np.empty((self.height, self.width, 3))
        rays[..., 0] = u[None, :]
        rays[..., 1] = v[:, None]
        rays[..., 2] = 1.0
        return rays

    def project(self, points_cam: np.ndarray):
        """Project camera-frame points (..., 3); returns pixel coordinates (..., 2) and z."""
        z = points_cam[..., 2]
        with np.errstate(divide='ignore', invalid='ignore'):
            u = self.fx * points_cam[..., 0] / z + self.cx
            v = self.fy * points_cam[..., 1] / z + self.cy
        return np.stack([u, v], axis=-1), z


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Pose:
    """Camera pose: world position and camera-to-world rotation (OpenCV camera axes)."""

    position: np.ndarray
    rotation: np.ndarray

    def to_camera(self, points_world: np.ndarray) -> np.ndarray:
        return (points_world - self.position) @ self.rotation


def camera_pose(cfg: CameraConfig, car_position, yaw: float, pitch: float,
                roll: float) -> Pose:
    """
    Camera pose of a car at ``car_position`` (ground point) with the given attitude.

    ``pitch`` > 0 lifts the nose, ``roll`` > 0 lifts the left side; the camera is mounted
    ``mount_height`` above the ground point and tilted by ``pitch_deg`` (negative looks down).
    """
    car_rot = rot_z(yaw) @ rot_y(-pitch) @ rot_x(roll)
    mount = np.array([cfg.mount_forward, 0.0, cfg.mount_height])
    position = np.asarray(car_position, dtype=np.float64) + car_rot @ mount
    rotation = car_rot @ rot_y(-math.radians(cfg.pitch_deg)) @ CAM_TO_CAR
    return Pose(position, rotation)
