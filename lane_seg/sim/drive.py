"""
The synthetic drive: a camera on a car in the procedural world, frame by frame.

>>> drive = SyntheticDrive(DriveConfig(seed=3, camera=CameraConfig(width=512, height=256)))
>>> frame = drive.frame(0)      # or: for frame in drive.frames(100): ...
>>> frame.image.shape, frame.lane_mask.max(), frame.flow.shape
"""

from dataclasses import dataclass, field, replace

import numpy as np

from .camera import camera_pose, CameraConfig, Intrinsics
from .flow_gt import forward_flow
from .render import Layer, Renderer
from .world import EgoState, make_weather, Road, Terrain, Traffic, WorldConfig


@dataclass(frozen=True)
class DriveConfig:
    """A drive: world, camera, frame rate and label conventions."""

    seed: int = 0
    camera: CameraConfig = field(default_factory=CameraConfig)
    world: WorldConfig | None = None   # None: WorldConfig(seed=seed)
    fps: float = 20.0                  # CARLA bridge default (fixed_delta_seconds 0.05)
    lane_width_px: int | None = None   # None: max(3, width / 100)
    lane_range_m: float = 100.0
    noise_std: float = 1.0

    def __post_init__(self):
        if not 1.0 <= self.fps <= 240.0:
            raise ValueError(f'fps={self.fps} outside [1, 240]')
        if self.world is None:
            object.__setattr__(self, 'world', WorldConfig(seed=self.seed))

    @classmethod
    def sized(cls, seed: int, height: int, width: int, **kwargs) -> 'DriveConfig':
        """Make a drive with the default camera resized to ``height`` x ``width``."""
        return cls(seed=seed, camera=replace(CameraConfig(), width=width, height=height),
                   **kwargs)


@dataclass
class Frame:
    """One frame with its exact labels. ``flow`` goes from this frame to the next one."""

    index: int
    stamp: float                 # seconds since the start of the drive
    image: np.ndarray            # uint8 BGR (H, W, 3)
    lane_mask: np.ndarray        # uint8 (H, W): 0 background, boundary ids 1..n+1, left first
    marking_mask: np.ndarray     # uint8 (H, W): 255 on visible paint
    flow: np.ndarray             # float32 (H, W, 2): pixels, to frame index + 1
    flow_valid: np.ndarray       # bool (H, W)
    inv_depth: np.ndarray        # float32 (H, W): 1 / depth, 0 for sky
    object_ids: np.ndarray       # int16 (H, W): -1 sky, 0 ground, k > 0 vehicle k
    intrinsics: Intrinsics
    ego: EgoState
    weather: str

    @property
    def lane_binary(self) -> np.ndarray:
        return (self.lane_mask > 0).astype(np.uint8)


class SyntheticDrive:
    """Deterministic from ``config.seed``: the same seed gives the same frames."""

    def __init__(self, config: DriveConfig = DriveConfig()):
        self.config = config
        wcfg = config.world
        rng = np.random.default_rng(wcfg.seed)
        self.terrain = Terrain(rng, wcfg.max_grade)
        self.road = Road(rng, wcfg)
        self.weather = make_weather(rng, wcfg.weather)
        self.intrinsics = Intrinsics.from_config(config.camera)
        self.renderer = Renderer(self.intrinsics, self.road, self.terrain, self.weather, rng,
                                 max_range=wcfg.max_range_m, lane_range=config.lane_range_m,
                                 lane_width_px=config.lane_width_px,
                                 noise_std=config.noise_std)
        self._traffic_seed = int(rng.integers(2**31))
        self._reset()

    def _reset(self):
        rng = np.random.default_rng(self._traffic_seed)
        self.traffic = Traffic(rng, self.config.world, self.road, self.terrain,
                               1.0 / self.config.fps)
        self._index = 0
        self._pending = None   # (index, Layer, EgoState) rendered ahead

    @property
    def dt(self) -> float:
        return 1.0 / self.config.fps

    def _render_current(self) -> tuple:
        ego = self.traffic.ego()
        pose = camera_pose(self.config.camera, ego.position, ego.yaw, ego.pitch, ego.roll)
        noise_rng = np.random.default_rng([self.config.world.seed, self._index])
        layer = self.renderer.render(pose, self.traffic.vehicle_states(), ego.s,
                                     self._index * self.dt, noise_rng)
        return layer, ego

    def _advance(self) -> tuple:
        """Render the current step, move the world on by dt; returns (index, layer, ego)."""
        layer, ego = self._render_current()
        out = (self._index, layer, ego)
        self.traffic.step()
        self._index += 1
        return out

    def next_frame(self) -> Frame:
        """Return the next frame in sequence (renders one frame ahead for the flow)."""
        if self._pending is None:
            self._pending = self._advance()
        index, layer, ego = self._pending
        self._pending = self._advance()
        _, nxt, _ = self._pending
        return self._make_frame(index, layer, ego, nxt)

    def frames(self, count: int, start: int = 0):
        """Yield ``count`` consecutive frames starting at index ``start``."""
        if start < self._current_index():
            self._reset()
        while self._current_index() < start:
            self._skip()
        for _ in range(count):
            yield self.next_frame()

    def frame(self, index: int) -> Frame:
        """Frame ``index`` (replays the drive from the start when going backwards)."""
        return next(self.frames(1, start=index))

    def _current_index(self) -> int:
        return self._pending[0] if self._pending is not None else self._index

    def _skip(self):
        """Move on one step without rendering (fast seek)."""
        if self._pending is not None:
            self._pending = None
            return
        self.traffic.step()
        self._index += 1

    def _make_frame(self, index: int, layer: Layer, ego: EgoState, nxt: Layer) -> Frame:
        flow, valid = forward_flow(layer, nxt, self.intrinsics)
        return Frame(index=index, stamp=index * self.dt, image=layer.image,
                     lane_mask=layer.lane_mask, marking_mask=layer.marking_mask,
                     flow=flow, flow_valid=valid, inv_depth=layer.inv_depth,
                     object_ids=layer.obj,
                     intrinsics=self.intrinsics, ego=ego, weather=self.weather.name)


def frames_per_second(drive: SyntheticDrive, count: int = 20) -> float:
    """Measure rendering speed (frames with all labels and flow) over ``count`` frames."""
    import time
    it = drive.frames(count + 1)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    return n / max(time.perf_counter() - t0, 1e-9)


__all__ = ['DriveConfig', 'Frame', 'SyntheticDrive', 'frames_per_second']
