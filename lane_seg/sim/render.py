"""
Ray-cast renderer of the synthetic drive, with exact lane, paint, depth and flow labels.

Every pixel's ray is intersected with the terrain (geometric march, then Illinois
refinement) and with box-shaped vehicles. The hit point is kept, so the colour, the labels
and the optical flow all derive from the same 3-D point: the flow of a static point is its
re-projection into the next camera; a vehicle point moves with its vehicle; a sky point
(at infinity) moves with the camera's rotation only.
"""

from dataclasses import dataclass
import math

import cv2
import numpy as np

from .camera import Intrinsics, Pose
from .textures import fold, fractal_noise, sample
from .world import Road, Terrain, VehicleState, Weather

SKY = -1
GROUND = 0


@dataclass
class Layer:
    """Everything rendered for one frame."""

    image: np.ndarray          # uint8 BGR (H, W, 3)
    lane_mask: np.ndarray      # uint8 (H, W): 0 background, i + 1 for boundary i
    marking_mask: np.ndarray   # uint8 (H, W): 255 where paint is visible
    inv_depth: np.ndarray      # float32 (H, W): 1 / z depth, 0 for sky
    points: np.ndarray         # float64 (H, W, 3): world hit points (NaN for sky)
    obj: np.ndarray            # int16 (H, W): SKY, GROUND or 1 + vehicle index
    rays: np.ndarray           # float64 (H, W, 3): world ray directions (camera z = 1)
    pose: Pose
    vehicles: list


def _vehicle_boxes(v: VehicleState):
    """Boxes (min, max, kind) in the vehicle frame (x forward, y left, z up)."""
    half_l, half_w, h = v.length / 2, v.width / 2, v.height
    return [
        (np.array([-half_l + 0.35, -half_w + 0.08, 0.0]),
         np.array([half_l - 0.35, half_w - 0.08, 0.34]), 'wheels'),
        (np.array([-half_l, -half_w, 0.3]), np.array([half_l, half_w, 0.62 * h]), 'body'),
        (np.array([-half_l + 0.45, -half_w + 0.1, 0.62 * h]),
         np.array([half_l - 1.35, half_w - 0.1, h]), 'cabin'),
    ]


def _vehicle_rotation(v: VehicleState) -> np.ndarray:
    c, s = math.cos(v.yaw), math.sin(v.yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class Renderer:
    """Renders frames of one world for one camera."""

    t_min = 0.3
    march_steps = 20
    refine_steps = 8

    def __init__(self, intrinsics: Intrinsics, road: Road, terrain: Terrain, weather: Weather,
                 rng: np.random.Generator, max_range: float = 400.0,
                 lane_range: float = 100.0, lane_width_px: int | None = None,
                 noise_std: float = 1.0):
        self.K = intrinsics
        self.road = road
        self.terrain = terrain
        self.weather = weather
        self.max_range = max_range
        self.lane_range = lane_range
        self.lane_width_px = lane_width_px or max(3, round(intrinsics.width / 100))
        self.noise_std = noise_std
        self.cam_rays = intrinsics.rays()
        self.ray_len = np.linalg.norm(self.cam_rays, axis=-1).astype(np.float32)
        self.tex_fine = fractal_noise(rng, 256, beta=1.2)
        self.tex_coarse = fractal_noise(rng, 256, beta=2.2)
        self.tex_wear = fractal_noise(rng, 256, beta=1.5)
        self.tex_cloud = fractal_noise(rng, 256, beta=2.0)
        self.hills = rng.uniform(0, 2 * math.pi, size=3)
        self.ratio = (max_range / self.t_min) ** (1.0 / self.march_steps)

    # ---------------------------------------------------------------- geometry
    def _terrain_f(self, t, dx, dy, dz, cz, k, a, p):
        """Height of the ray above the terrain at parameter t (float32, local coordinates)."""
        x = t * dx
        y = t * dy
        h = (a[0] * np.sin(k[0] * x + p[0]) + a[1] * np.sin(k[1] * x + p[1])
             + a[2] * np.sin(k[2] * y + p[2]) + a[3] * np.sin(k[3] * y + p[3]))
        return cz + t * dz - h

    def cast_terrain(self, pose: Pose, rays_world: np.ndarray) -> np.ndarray:
        """Ray parameter of the first terrain hit per pixel (inf where none in range)."""
        H, W = rays_world.shape[:2]
        flat = rays_world.reshape(-1, 3)
        horiz = np.hypot(flat[:, 0], flat[:, 1])
        cand = np.flatnonzero(flat[:, 2] < 0.12 * horiz)
        k, a, p = self.terrain.local(pose.position)
        cz = np.float32(pose.position[2])
        dx = flat[cand, 0].astype(np.float32)
        dy = flat[cand, 1].astype(np.float32)
        dz = flat[cand, 2].astype(np.float32)
        lo = np.full(cand.size, np.nan, np.float32)
        hi = np.full(cand.size, np.nan, np.float32)
        f_lo = np.zeros(cand.size, np.float32)
        f_hi = np.zeros(cand.size, np.float32)
        active = np.arange(cand.size)
        t_prev = np.float32(self.t_min)
        f_prev = self._terrain_f(t_prev, dx, dy, dz, cz, k, a, p)
        # A ray starting under the ground (should not happen) hits at t_min.
        under = f_prev <= 0
        lo[under] = hi[under] = t_prev
        active = active[~under]
        f_prev = f_prev[~under]
        for _ in range(self.march_steps):
            t_next = np.float32(t_prev * self.ratio)
            i = active
            f_next = self._terrain_f(t_next, dx[i], dy[i], dz[i], cz, k, a, p)
            crossed = f_next <= 0
            j = i[crossed]
            lo[j], hi[j] = t_prev, t_next
            f_lo[j], f_hi[j] = f_prev[crossed], f_next[crossed]
            active = i[~crossed]
            f_prev = f_next[~crossed]
            t_prev = t_next
            if active.size == 0:
                break
        # Illinois refinement inside each bracket.
        sel = np.flatnonzero(np.isfinite(lo) & (hi > lo))
        a_t, b_t, fa, fb = lo[sel], hi[sel], f_lo[sel], f_hi[sel]
        ddx, ddy, ddz = dx[sel], dy[sel], dz[sel]
        for _ in range(self.refine_steps):
            denom = fb - fa
            c = np.where(denom != 0, b_t - fb * (b_t - a_t) / np.where(denom != 0, denom, 1),
                         b_t)
            fc = self._terrain_f(c, ddx, ddy, ddz, cz, k, a, p)
            flip = fc * fb < 0  # root between c and b: b becomes the other end
            # Illinois: when the retained end is kept again, halve its value.
            fa = np.where(flip, fb, fa * 0.5)
            a_t = np.where(flip, b_t, a_t)
            b_t, fb = c, fc
        t_hit = np.full(flat.shape[0], np.inf)
        res = np.where(np.isfinite(lo) & (hi == lo), lo, np.nan).astype(np.float64)
        res[sel] = b_t.astype(np.float64)
        ok = np.isfinite(res)
        t_hit[cand[ok]] = res[ok]
        return t_hit.reshape(H, W)

    def road_coords(self, points: np.ndarray, s0: float):
        """
        Arc length s and left offset d of world points (N, 3), by Newton steps.

        Uses a look-up table window of the centre line around ``s0`` sampled with cv2.remap
        (fast linear interpolation of x, y, cos and sin of the heading).
        """
        n = points.shape[0]
        points = fold(points)
        road = self.road
        i0 = max(0, int(road.index(s0 - 60.0)))
        i1 = min(road.s.size, int(road.index(s0 + self.max_range + 120.0)) + 1)
        origin = np.array([road.x[i0], road.y[i0]])
        lut = np.stack([road.x[i0:i1] - origin[0], road.y[i0:i1] - origin[1],
                        np.cos(road.heading[i0:i1]), np.sin(road.heading[i0:i1])],
                       axis=-1).astype(np.float32)[None]
        px = (points[..., 0] - origin[0]).astype(np.float32)
        py = (points[..., 1] - origin[1]).astype(np.float32)
        ego = lut[0, int(road.index(s0)) - i0]
        idx = (int(road.index(s0)) - i0
               + ((px - ego[0]) * ego[2] + (py - ego[1]) * ego[3]) / road.ds).astype(np.float32)
        zeros = np.zeros_like(idx)
        for _ in range(4):
            idx = np.clip(idx, 0, lut.shape[1] - 1)
            c = cv2.remap(lut, idx, zeros, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            along = (px - c[..., 0]) * c[..., 2] + (py - c[..., 1]) * c[..., 3]
            idx = idx + along / road.ds
        idx = np.clip(idx, 0, lut.shape[1] - 1)
        c = cv2.remap(lut, idx, zeros, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        d = -(px - c[..., 0]) * c[..., 3] + (py - c[..., 1]) * c[..., 2]
        s = road.s[i0] + idx.astype(np.float64) * road.ds
        return s.reshape(-1)[:n], d.reshape(-1)[:n]

    def cast_vehicles(self, pose: Pose, rays_world, t_best, obj, normals, kinds, vehicles):
        """Intersect rays with the vehicles' boxes; updates t_best/obj/normals/kinds in place."""
        H, W = t_best.shape
        kind_ids = {'wheels': 1, 'body': 2, 'cabin': 3}
        for vi, v in enumerate(vehicles):
            rot = _vehicle_rotation(v)
            rel = v.position - pose.position
            if np.linalg.norm(rel[:2]) > self.max_range:
                continue
            corners = np.array([[sx * v.length / 2, sy * v.width / 2, sz * v.height]
                                for sx in (-1, 1) for sy in (-1, 1) for sz in (0, 1)])
            cam = pose.to_camera(corners @ rot.T + v.position)
            if np.all(cam[:, 2] <= 0.1):
                continue
            if np.any(cam[:, 2] <= 0.1):
                u0, v0, u1, v1 = 0, 0, W, H
            else:
                uv, _ = self.K.project(cam)
                u0 = int(max(0, np.floor(uv[:, 0].min()) - 1))
                u1 = int(min(W, np.ceil(uv[:, 0].max()) + 2))
                v0 = int(max(0, np.floor(uv[:, 1].min()) - 1))
                v1 = int(min(H, np.ceil(uv[:, 1].max()) + 2))
                if u0 >= u1 or v0 >= v1:
                    continue
            d = rays_world[v0:v1, u0:u1] @ rot            # ray directions, vehicle frame
            o = (pose.position - v.position) @ rot         # camera origin, vehicle frame
            with np.errstate(divide='ignore', invalid='ignore'):
                inv = 1.0 / d
            for lo_b, hi_b, kind in _vehicle_boxes(v):
                with np.errstate(invalid='ignore'):
                    t1 = (lo_b - o) * inv
                    t2 = (hi_b - o) * inv
                tn = np.minimum(t1, t2)
                tf = np.maximum(t1, t2)
                t_enter = np.nanmax(tn, axis=-1)
                t_exit = np.nanmin(tf, axis=-1)
                axis = np.nanargmax(tn, axis=-1)
                hit = (t_exit >= t_enter) & (t_enter > 0.05)
                sub_t = t_best[v0:v1, u0:u1]
                closer = hit & (t_enter < sub_t)
                if not closer.any():
                    continue
                sub_t[closer] = t_enter[closer]
                obj[v0:v1, u0:u1][closer] = 1 + vi
                kinds[v0:v1, u0:u1][closer] = kind_ids[kind]
                n_local = np.zeros(d.shape)
                sign = -np.sign(np.take_along_axis(d, axis[..., None], axis=-1))[..., 0]
                np.put_along_axis(n_local, axis[..., None], sign[..., None], axis=-1)
                normals[v0:v1, u0:u1][closer] = (n_local @ rot.T)[closer]

    # ---------------------------------------------------------------- shading
    def render(self, pose: Pose, vehicles: list, ego_s: float, t: float,
               frame_rng: np.random.Generator) -> Layer:
        """Render one frame seen from ``pose`` with the vehicles at their current states."""
        H, W = self.K.height, self.K.width
        rays = self.cam_rays @ pose.rotation.T
        t_ground = self.cast_terrain(pose, rays)
        t_best = t_ground.copy()
        obj = np.where(np.isfinite(t_ground), GROUND, SKY).astype(np.int16)
        normals = np.zeros((H, W, 3))
        kinds = np.zeros((H, W), np.int8)
        self.cast_vehicles(pose, rays, t_best, obj, normals, kinds, vehicles)
        finite = np.isfinite(t_best)
        points = np.full((H, W, 3), np.nan)
        points[finite] = pose.position + rays[finite] * t_best[finite][:, None]
        inv_depth = np.where(finite, 1.0 / np.where(finite, t_best, 1.0), 0.0).astype(np.float32)

        w = self.weather
        light = 1.0 + w.flicker * math.sin(2 * math.pi * t / w.flicker_period)
        color = np.zeros((H, W, 3), np.float32)
        ground = obj == GROUND
        paint_mask = np.zeros((H, W), bool)
        if ground.any():
            paint_mask = self._shade_ground(color, points, ground, pose, ego_s)
        veh = obj > 0
        if veh.any():
            self._shade_vehicles(color, veh, obj, normals, kinds, vehicles, points)
        sky = obj == SKY
        if sky.any():
            color[sky] = self._sky(rays[sky])
        # Lighting, fog, tint.
        color *= (w.tint * light)[None, None, :]
        # Euclidean distance = z depth * ray length (ray lengths do not change with the pose).
        dist = np.where(finite, t_best, 0.0).astype(np.float32) * self.ray_len
        fog = (1.0 - np.exp(-dist / np.float32(w.fog_dist)))[..., None]
        color = color * (1.0 - fog) + w.fog_color[None, None, :] * fog
        if self.noise_std > 0:
            color += self.noise_std * frame_rng.standard_normal(color.shape, dtype=np.float32)
        image = np.clip(color, 0, 255).astype(np.uint8)
        terrain_inv = np.where(np.isfinite(t_ground), 1.0 / np.where(np.isfinite(t_ground),
                                                                     t_ground, 1.0), 0.0)
        lane_mask = self.lane_mask(pose, ego_s, terrain_inv)
        marking = (paint_mask & ground).astype(np.uint8) * 255
        return Layer(image, lane_mask, marking, inv_depth, points, obj, rays, pose, vehicles)

    def paint_alpha(self, s, d, foot_d, foot_s):
        """
        Coverage of lane paint at road coordinates, and the paint colour.

        ``foot_d`` and ``foot_s`` are the pixel footprint across and along the road (m): the
        coverage ramps over one footprint at the paint's edges (anti-aliasing), so its 0.5
        level is exactly the painted area. Worn paint is cut out by a noise texture.
        """
        road = self.road
        width = np.interp(s, road.s, road.width)
        alpha = np.zeros(s.shape, np.float32)
        color = np.zeros(s.shape + (3,), np.float32)
        wear = sample(self.tex_wear, s * 0.5, d * 4.0, 0.05)
        for i, b in enumerate(road.boundaries):
            off = (road.lanes / 2.0 - i) * width
            a = np.clip((b.paint_width_m / 2 - np.abs(d - off)) / foot_d + 0.5, 0.0, 1.0)
            if b.dashed:
                q = np.mod(s - b.phase_m, b.period_m)
                inside = q < b.dash_m
                edge = np.where(inside, np.minimum(q, b.dash_m - q),
                                -np.minimum(q - b.dash_m, b.period_m - q))
                a = a * np.clip(edge / foot_s + 0.5, 0.0, 1.0)
            a = a * (wear > b.wear * 0.75)
            a = a.astype(np.float32)
            take = a > alpha
            color[take] = b.color
            alpha = np.maximum(alpha, a)
        return alpha, color

    def _shade_ground(self, color, points, ground, pose, ego_s):
        w = self.weather
        gp = points[ground]
        x, y = gp[:, 0], gp[:, 1]
        s, d = self.road_coords(gp, ego_s)
        half = self.road.lanes / 2.0 * np.interp(s, self.road.s, self.road.width)
        tex = sample

        # Pixel footprint on the ground: across the view dist / f, along it stretched by the
        # grazing angle. Textures fade out where a pixel covers several texels (a cheap
        # mip-map), so distant ground does not alias from frame to frame.
        dist = np.linalg.norm(gp - pose.position, axis=-1)
        foot_d = dist / self.K.fx
        height = max(pose.position[2] - float(np.median(gp[:, 2])) if gp.size else 1.0, 0.5)
        foot_s = foot_d * np.maximum(1.0, dist / height)

        foot = np.sqrt(foot_d * foot_s)

        def octave(texture, texel, shift):
            """Zero-mean texture detail at one scale, faded where it would alias."""
            amp = np.clip(1.0 - (foot / texel - 1.0) / 2.0, 0.0, 1.0)
            return (tex(texture, x + shift, y - shift, texel) - 0.5) * amp

        # Four octaves of grain: there is texture at the pixel scale at every distance.
        grain = (50.0 * octave(self.tex_fine, 0.03, 0.0)
                 + 45.0 * octave(self.tex_fine, 0.12, 13.7)
                 + 40.0 * octave(self.tex_coarse, 0.5, 0.0)
                 + 30.0 * octave(self.tex_coarse, 2.5, 71.3))
        edge_noise = (tex(self.tex_coarse, s * 0.3, d, 0.5) - 0.5) * 0.5
        # Road coverage ramps over one pixel footprint at the edge (anti-aliased).
        on_road = np.clip((half + self.road.shoulder + edge_noise - np.abs(d)) / foot_d + 0.5,
                          0.0, 1.0).astype(np.float32)
        asphalt = (105.0 + grain)[:, None] * np.array([1.0, 1.0, 0.97], np.float32)
        grass = (1.0 + grain / 60.0)[:, None] * np.array([45.0, 105.0, 80.0], np.float32)
        base = asphalt * on_road[:, None] + grass * (1.0 - on_road[:, None])
        if w.wet > 0:
            base = base * (1.0 - 0.35 * w.wet * on_road[:, None])
        alpha, paint = self.paint_alpha(s, d, foot_d, foot_s)
        alpha *= on_road
        paint = paint * (0.92 + grain[:, None] / 400.0)
        base = base * (1 - alpha[:, None]) + paint * alpha[:, None]
        # Lambert shading with the terrain normal, static shadows fixed to the world.
        gx, gy = self.terrain.gradient(x, y)
        normal = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        lambert = np.clip(normal @ w.sun_dir, 0.0, 1.0)
        shade = w.ambient + w.sun * lambert
        if w.shadows > 0:
            blob = tex(self.tex_coarse, x + 37.0, y - 11.0, 0.35)
            side = np.clip((np.abs(d) - half + 4.0) / 6.0, 0.0, 1.0)
            shadow = np.clip((blob - 0.55) * 5.0, 0.0, 1.0) * side
            shade = shade * (1.0 - w.shadows * shadow)
        col = base * shade[:, None]
        if w.wet > 0:
            view = gp - pose.position
            view /= np.linalg.norm(view, axis=-1, keepdims=True)
            refl = view - 2 * np.sum(view * normal, axis=-1, keepdims=True) * normal
            spec = np.exp((refl @ w.sun_dir - 1.0) * 60.0) * w.wet * 120.0
            col += (spec * on_road)[:, None]
        color[ground] = col
        paint_mask = np.zeros(ground.shape, bool)
        paint_mask[ground] = alpha > 0.5
        return paint_mask

    def _shade_vehicles(self, color, veh, obj, normals, kinds, vehicles, points):
        w = self.weather
        ids = obj[veh] - 1
        body = np.array([vehicles[i].color for i in range(len(vehicles))], np.float32)[ids]
        k = kinds[veh]
        n = normals[veh]
        # Dirt and panel grain fixed to each vehicle (vehicle-frame texture coordinates).
        local = np.zeros((ids.size, 3))
        for i in np.unique(ids):
            sel = ids == i
            local[sel] = (points[veh][sel] - vehicles[i].position) @ _vehicle_rotation(
                vehicles[i])
        grain = sample(self.tex_coarse, local[:, 0] + local[:, 1],
                       local[:, 2] - 0.3 * local[:, 0], 0.08) - 0.5
        lambert = np.clip(n @ w.sun_dir, 0.0, 1.0)
        base = body.copy()
        base[k == 1] = (28.0, 28.0, 30.0)
        glass = (k == 3) & (np.abs(n[:, 2]) < 0.5)
        base[glass] = (70.0, 58.0, 52.0)
        base = base * (1.0 + 0.6 * grain)[:, None] + 50.0 * grain[:, None]
        shade = w.ambient + w.sun * lambert + 0.15 * np.clip(n[:, 2], 0, 1)
        color[veh] = base * shade[:, None]

    def _sky(self, d):
        w = self.weather
        horiz = np.hypot(d[:, 0], d[:, 1])
        el = np.arctan2(d[:, 2], horiz)
        az = np.arctan2(d[:, 1], d[:, 0])
        mix = np.clip(el * 2.5, 0.0, 1.0)[:, None]
        col = w.sky_horizon * (1 - mix) + w.sky_top * mix
        clouds = sample(self.tex_cloud, az * 40.0, np.tan(np.clip(el, 0.01, 1.4)) * 25.0, 1.0)
        cover = np.clip((clouds - 0.5) * 3.0, 0.0, 1.0)[:, None] * np.clip(el * 10, 0, 1)[:, None]
        col = col * (1 - 0.6 * cover) + 245.0 * 0.6 * cover
        ridge = (0.012 + 0.008 * np.sin(3 * az + self.hills[0])
                 + 0.005 * np.sin(7 * az + self.hills[1])
                 + 0.003 * np.sin(19 * az + self.hills[2]))
        hill = (el < ridge)[:, None]
        hill_col = 0.55 * w.fog_color + 0.45 * np.array([90.0, 110.0, 95.0], np.float32)
        return np.where(hill, hill_col, col)

    # ---------------------------------------------------------------- labels
    def lane_mask(self, pose: Pose, ego_s: float, terrain_inv: np.ndarray) -> np.ndarray:
        """
        Lane boundaries as continuous curves of fixed pixel width, ids 1..n+1 (left first).

        Drawn through dashes and vehicles (the CULane/TuSimple convention), cut where the
        terrain hides the road (crests) and beyond ``lane_range``.
        """
        H, W = self.K.height, self.K.width
        mask = np.zeros((H, W), np.uint8)
        road = self.road
        s = ego_s + np.concatenate([np.arange(-4.0, 30.0, 0.5),
                                    np.arange(30.0, self.lane_range + 1e-6, 1.5)])
        for i in range(road.lanes + 1):
            d = road.boundary_offset(i, s)
            x, y = road.point(s, d)
            pts = np.stack([x, y, self.terrain.height(x, y)], axis=-1)
            cam = pose.to_camera(pts)
            uv, z = self.K.project(cam)
            keep = (z > 0.8) & (np.abs(uv[:, 0]) < 4 * W) & (np.abs(uv[:, 1]) < 4 * H)
            ui = np.clip(np.round(uv[:, 0]).astype(int, copy=False), 0, W - 1)
            vi = np.clip(np.round(np.nan_to_num(uv[:, 1])).astype(int), 0, H - 1)
            inside = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            with np.errstate(divide='ignore'):
                inv = 1.0 / z
            hidden = inside & (terrain_inv[vi, ui] > inv * 1.05 + 0.004)
            keep &= ~hidden
            runs = np.split(np.arange(s.size), np.flatnonzero(np.diff(keep.astype(int))) + 1)
            for run in runs:
                if run.size < 2 or not keep[run[0]]:
                    continue
                poly = np.round(uv[run] * 16).astype(np.int32)
                cv2.polylines(mask, [poly], False, i + 1, self.lane_width_px, cv2.LINE_8,
                              shift=4)
        return mask
