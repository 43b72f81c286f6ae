"""
The procedural world of the synthetic drive: terrain, road, markings, traffic and weather.

Everything here is a deterministic function of a seed. The road is a planar centre line
``c(s)`` (arc length ``s``) integrated from a smooth random curvature, laid on a terrain
``z = h(x, y)`` made of long sine waves (so the road climbs and falls with changing grades).
Lateral offsets ``d`` are measured to the left of the centre line. Lane boundaries sit at
``d_i(s) = (n / 2 - i) * w(s)`` for ``i = 0..n`` (0 is the leftmost), with a lane width
``w(s)`` that varies slowly along the road.
"""

from dataclasses import dataclass, field
import math

import numpy as np

WEATHERS = ('clear', 'dusk', 'fog', 'wet', 'overcast')


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the procedural world; every random choice is drawn from ``seed``."""

    seed: int = 0
    lanes: int | None = None           # 2..4; None draws it from the seed
    weather: str | None = None         # one of WEATHERS; None draws it from the seed
    max_curvature: float = 1.0 / 180.0  # 1/m
    max_grade: float = 0.05            # terrain slope bound
    vehicles: int = 4
    lane_change_interval_s: tuple = (6.0, 14.0)
    speed_range: tuple = (9.0, 22.0)   # m/s
    length_m: float = 6000.0
    max_range_m: float = 400.0

    def __post_init__(self):
        if self.lanes is not None and not 2 <= self.lanes <= 4:
            raise ValueError(f'lanes={self.lanes} outside [2, 4]')
        if self.weather is not None and self.weather not in WEATHERS:
            raise ValueError(f'weather={self.weather!r} not one of {WEATHERS}')
        if not 0.0 <= self.max_grade <= 0.12:
            raise ValueError(f'max_grade={self.max_grade} outside [0, 0.12]')
        if self.vehicles < 0:
            raise ValueError('vehicles must be >= 0')


@dataclass(frozen=True)
class Boundary:
    """One lane boundary: its painted style."""

    color: tuple        # BGR paint colour
    dashed: bool
    dash_m: float
    period_m: float
    phase_m: float
    paint_width_m: float
    wear: float          # 0 fresh .. 1 heavily worn


class Terrain:
    """Height field ``h(x, y) = sum_j a_j sin(k_j x + p_j) + b_j sin(l_j y + q_j)``."""

    def __init__(self, rng: np.random.Generator, max_grade: float):
        self.kx = 2 * math.pi / rng.uniform(250.0, 900.0, size=2)
        self.ky = 2 * math.pi / rng.uniform(250.0, 900.0, size=2)
        # Each wave gets a share of the grade budget (slope of a*sin(kx) is a*k).
        share = rng.dirichlet(np.ones(4)) * max_grade
        self.ax = share[:2] / self.kx
        self.ay = share[2:] / self.ky
        self.px = rng.uniform(0, 2 * math.pi, size=2)
        self.py = rng.uniform(0, 2 * math.pi, size=2)

    def height(self, x, y):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        h = np.zeros(np.broadcast(x, y).shape)
        for j in range(2):
            h = h + self.ax[j] * np.sin(self.kx[j] * x + self.px[j])
            h = h + self.ay[j] * np.sin(self.ky[j] * y + self.py[j])
        return h

    def gradient(self, x, y):
        gx = sum(self.ax[j] * self.kx[j] * np.cos(self.kx[j] * x + self.px[j]) for j in range(2))
        gy = sum(self.ay[j] * self.ky[j] * np.cos(self.ky[j] * y + self.py[j]) for j in range(2))
        return gx, gy

    def local(self, origin):
        """
        Float32-friendly form around ``origin``: coefficients with phases folded in.

        Returns ``(k, a, p)`` for the four waves such that for coordinates relative to the
        origin, ``h = sum a * sin(k * rel + p)`` (x waves first, then y waves).
        """
        ox, oy = float(origin[0]), float(origin[1])
        k = np.concatenate([self.kx, self.ky])
        a = np.concatenate([self.ax, self.ay])
        p = np.concatenate([np.mod(self.kx * ox + self.px, 2 * math.pi),
                            np.mod(self.ky * oy + self.py, 2 * math.pi)])
        return k.astype(np.float32), a.astype(np.float32), p.astype(np.float32)


class Road:
    """Centre line, lane widths and marking styles, sampled every ``ds`` metres."""

    ds = 0.25

    def __init__(self, rng: np.random.Generator, cfg: WorldConfig):
        n = int(cfg.length_m / self.ds) + 1
        self.s = np.arange(n) * self.ds - 200.0
        # Curvature: piecewise targets (straights and bends), smoothed into clothoid-like
        # transitions.
        kappa = np.zeros(n)
        i = 0
        while i < n:
            seg = int(rng.uniform(80.0, 320.0) / self.ds)
            target = 0.0 if rng.random() < 0.3 else rng.uniform(-1, 1) * cfg.max_curvature
            kappa[i:i + seg] = target
            i += seg
        kernel = np.ones(int(60.0 / self.ds))
        kappa = np.convolve(kappa, kernel / kernel.size, mode='same')
        heading = np.cumsum(kappa) * self.ds
        heading -= heading[int(200.0 / self.ds)]
        self.heading = heading
        self.kappa = kappa
        self.x = np.cumsum(np.cos(heading)) * self.ds
        self.y = np.cumsum(np.sin(heading)) * self.ds
        origin = int(200.0 / self.ds)
        self.x -= self.x[origin]
        self.y -= self.y[origin]
        # Lane width w(s): base width plus slow variation.
        base = rng.uniform(3.1, 3.7)
        lam = rng.uniform(150.0, 400.0)
        self.width = base + 0.25 * np.sin(2 * math.pi * self.s / lam + rng.uniform(0, 6.28))
        self.lanes = cfg.lanes or int(rng.integers(2, 5))
        self.shoulder = rng.uniform(0.6, 2.0)
        self.boundaries = [self._boundary_style(rng, i) for i in range(self.lanes + 1)]

    def _boundary_style(self, rng, i) -> Boundary:
        white = (235, 235, 235)
        yellow = (40, 190, 235)
        outer = i in (0, self.lanes)
        dashed = not outer and rng.random() > 0.15
        color = yellow if (i == 0 and rng.random() < 0.5) else white
        dash = rng.uniform(2.0, 4.0)
        return Boundary(color=color, dashed=dashed, dash_m=dash,
                        period_m=dash + rng.uniform(4.0, 9.0),
                        phase_m=rng.uniform(0.0, 10.0),
                        paint_width_m=rng.uniform(0.12, 0.2),
                        wear=float(rng.uniform(0.0, 0.6)))

    def index(self, s):
        return (np.asarray(s) - self.s[0]) / self.ds

    def sample(self, s, arr):
        return np.interp(s, self.s, arr)

    def point(self, s, d):
        """World (x, y) of road coordinates (s, d)."""
        th = self.sample(s, self.heading)
        return (self.sample(s, self.x) - d * np.sin(th), self.sample(s, self.y) + d * np.cos(th))

    def boundary_offset(self, i, s):
        return (self.lanes / 2.0 - i) * self.sample(s, self.width)

    def lane_center(self, lane, s):
        return (self.lanes / 2.0 - lane - 0.5) * self.sample(s, self.width)

    def half_width(self, s):
        return self.lanes / 2.0 * self.sample(s, self.width)


@dataclass
class Weather:
    """Lighting of one drive."""

    name: str
    sun_dir: np.ndarray         # unit vector towards the sun (world)
    sun: float                  # direct light strength
    ambient: float
    tint: np.ndarray            # BGR multiplier
    sky_top: np.ndarray         # BGR
    sky_horizon: np.ndarray     # BGR
    fog_color: np.ndarray       # BGR
    fog_dist: float             # metres for 63% fog
    wet: float                  # specular strength of the road
    shadows: float              # darkening of static shadows (0 none)
    flicker: float = 0.05       # amplitude of slow global light changes
    flicker_period: float = 17.0
    extra: dict = field(default_factory=dict)


def make_weather(rng: np.random.Generator, name: str | None) -> Weather:
    name = name or WEATHERS[int(rng.integers(len(WEATHERS)))]
    az = rng.uniform(0, 2 * math.pi)
    el = {'clear': 0.9, 'dusk': 0.12, 'fog': 0.6, 'wet': 0.5, 'overcast': 0.8}[name]
    sun_dir = np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
    #           sun   ambient  tint (BGR)          sky top          sky horizon
    #           fog colour       fog m   wet  shadows
    presets = {
        'clear': (0.75, 0.45, (1.0, 1.0, 1.0), (220, 150, 90), (235, 215, 195),
                  (225, 210, 195), 900.0, 0.0, 0.45),
        'dusk': (0.55, 0.3, (0.75, 0.85, 1.1), (120, 80, 70), (110, 150, 230),
                 (110, 130, 170), 700.0, 0.0, 0.35),
        'fog': (0.2, 0.75, (1.0, 1.0, 1.0), (200, 200, 195), (205, 205, 200),
                (200, 200, 196), 70.0, 0.1, 0.0),
        'wet': (0.35, 0.55, (1.0, 0.97, 0.95), (150, 140, 130), (185, 180, 175),
                (175, 172, 168), 260.0, 0.9, 0.1),
        'overcast': (0.15, 0.8, (1.0, 1.0, 1.0), (185, 175, 165), (215, 210, 205),
                     (205, 200, 195), 500.0, 0.0, 0.0),
    }
    keys = ('sun', 'ambient', 'tint', 'sky_top', 'sky_horizon', 'fog_color', 'fog_dist', 'wet',
            'shadows')
    table = dict(zip(keys, presets[name]))
    return Weather(name=name, sun_dir=sun_dir,
                   sun=table['sun'] * rng.uniform(0.9, 1.1),
                   ambient=table['ambient'] * rng.uniform(0.9, 1.1),
                   tint=np.array(table['tint'], dtype=np.float32),
                   sky_top=np.array(table['sky_top'], dtype=np.float32),
                   sky_horizon=np.array(table['sky_horizon'], dtype=np.float32),
                   fog_color=np.array(table['fog_color'], dtype=np.float32),
                   fog_dist=table['fog_dist'], wet=table['wet'], shadows=table['shadows'],
                   flicker=float(rng.uniform(0.0, 0.06)),
                   flicker_period=float(rng.uniform(10.0, 30.0)))


@dataclass(frozen=True)
class VehicleState:
    """A vehicle's ground point, heading, size and colour at one instant."""

    position: np.ndarray   # (x, y, z) ground point under the centre
    yaw: float
    length: float
    width: float
    height: float
    color: tuple           # BGR


@dataclass(frozen=True)
class EgoState:
    s: float
    d: float
    speed: float
    position: np.ndarray
    yaw: float
    pitch: float
    roll: float


class Traffic:
    """Ego motion (speed changes, lane changes) and other vehicles, stepped at fixed dt."""

    def __init__(self, rng: np.random.Generator, cfg: WorldConfig, road: Road,
                 terrain: Terrain, dt: float):
        self.rng = rng
        self.cfg = cfg
        self.road = road
        self.terrain = terrain
        self.dt = dt
        self.t = 0.0
        self.s = 0.0
        self.lane = int(rng.integers(road.lanes))
        self.lane_from = self.lane
        self.change_start = None
        self.change_dur = 3.5
        self.next_change = rng.uniform(*cfg.lane_change_interval_s)
        self.speed = rng.uniform(*cfg.speed_range)
        self.target_speed = rng.uniform(*cfg.speed_range)
        self.vehicles = []
        for _ in range(cfg.vehicles):
            self.vehicles.append(self._spawn(rng.uniform(-60.0, 250.0)))

    def _spawn(self, rel_s):
        rng = self.rng
        palette = [(40, 40, 180), (180, 60, 30), (200, 200, 200), (30, 30, 30),
                   (40, 140, 40), (0, 170, 220), (150, 150, 150), (90, 40, 120)]
        lane = int(rng.integers(self.road.lanes))
        return {
            's': self.s + rel_s, 'lane': lane,
            'speed': rng.uniform(*self.cfg.speed_range),
            'length': rng.uniform(4.0, 5.2), 'width': rng.uniform(1.7, 2.0),
            'height': rng.uniform(1.35, 1.8),
            'color': palette[int(rng.integers(len(palette)))],
        }

    def _lane_offset(self, s):
        road = self.road
        d_to = road.lane_center(self.lane, s)
        if self.change_start is None:
            return d_to
        u = min(1.0, (self.t - self.change_start) / self.change_dur)
        w = 0.5 - 0.5 * math.cos(math.pi * u)
        return (1 - w) * road.lane_center(self.lane_from, s) + w * d_to

    def ego(self) -> EgoState:
        road = self.road
        d = self._lane_offset(self.s)
        eps = 0.5
        dd_ds = (self._lane_offset(self.s + eps) - self._lane_offset(self.s - eps)) / (2 * eps)
        if self.change_start is not None and self.t - self.change_start < self.change_dur:
            u = (self.t - self.change_start) / self.change_dur
            dw = 0.5 * math.pi * math.sin(math.pi * u) / self.change_dur
            diff = road.lane_center(self.lane, self.s) - road.lane_center(self.lane_from, self.s)
            dd_ds += dw * diff / max(self.speed, 0.1)
        x, y = road.point(self.s, d)
        z = float(self.terrain.height(x, y))
        yaw = float(road.sample(self.s, road.heading)) + math.atan(dd_ds)
        gx, gy = self.terrain.gradient(x, y)
        pitch = math.atan(gx * math.cos(yaw) + gy * math.sin(yaw))
        roll = math.atan(-gx * math.sin(yaw) + gy * math.cos(yaw))
        return EgoState(self.s, float(d), self.speed, np.array([float(x), float(y), z]),
                        yaw, pitch, roll)

    def vehicle_states(self) -> list:
        road = self.road
        out = []
        for v in self.vehicles:
            d = road.lane_center(v['lane'], v['s'])
            x, y = road.point(v['s'], d)
            z = float(self.terrain.height(x, y))
            yaw = float(road.sample(v['s'], road.heading))
            out.append(VehicleState(np.array([float(x), float(y), z]), yaw, v['length'],
                                    v['width'], v['height'], v['color']))
        return out

    def step(self):
        """Advance one time step of ``dt`` seconds."""
        rng, dt = self.rng, self.dt
        self.t += dt
        # Ego speed eases towards a target that changes now and then.
        if rng.random() < dt / 8.0:
            self.target_speed = rng.uniform(*self.cfg.speed_range)
        self.speed += float(np.clip(self.target_speed - self.speed, -1.5 * dt, 1.5 * dt))
        self.s += self.speed * dt
        # Lane changes.
        if self.change_start is not None and self.t - self.change_start >= self.change_dur:
            self.change_start = None
            self.lane_from = self.lane
        if self.change_start is None and self.t >= self.next_change and self.road.lanes > 1:
            step = 1 if self.lane == 0 else -1 if self.lane == self.road.lanes - 1 else \
                int(rng.choice([-1, 1]))
            if self._lane_clear(self.lane + step):
                self.lane_from, self.lane = self.lane, self.lane + step
                self.change_start = self.t
            self.next_change = self.t + rng.uniform(*self.cfg.lane_change_interval_s)
        # Other vehicles: keep a gap to the ego in its lanes, respawn out of sight.
        far = self.cfg.max_range_m + 20.0
        for v in self.vehicles:
            gap = v['s'] - self.s
            same = v['lane'] in (self.lane, self.lane_from)
            speed = v['speed']
            if same and 0.0 < gap < 25.0:
                speed = max(speed, self.speed + 2.0)
            elif same and -25.0 < gap <= 0.0:
                speed = min(speed, self.speed - 2.0)
            v['s'] += max(speed, 0.0) * dt
            if abs(v['s'] - self.s) > far:
                new = self._spawn(-(far - 10.0) if v['s'] > self.s else far - 10.0)
                v.clear()
                v.update(new)

    def _lane_clear(self, lane):
        return all(not (v['lane'] == lane and -20.0 < v['s'] - self.s < 30.0)
                   for v in self.vehicles)
