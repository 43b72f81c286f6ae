"""Exact forward optical flow between two rendered frames, with an occlusion-aware mask."""

import cv2
import numpy as np

from .camera import Intrinsics
from .render import _vehicle_rotation, Layer, SKY


def forward_flow(prev: Layer, nxt: Layer, K: Intrinsics, rel_tol: float = 0.04,
                 abs_tol: float = 2e-3):
    """
    Flow from ``prev`` to ``nxt`` in pixels, float32 (H, W, 2), and its validity mask.

    Each pixel's 3-D point moves to where it is at the next instant (static points stay,
    vehicle points move with their vehicle, sky points are at infinity) and is projected
    into the next camera. A pixel is valid when the point lands inside the next image, in
    front of the camera, and is the surface seen there: its inverse depth matches the next
    frame's inverse depth (bilinear, exact for planes) within ``rel_tol`` and ``abs_tol``.
    """
    H, W = prev.obj.shape
    moved = prev.points.copy()
    for vi, (v0, v1) in enumerate(zip(prev.vehicles, nxt.vehicles)):
        sel = prev.obj == vi + 1
        if not sel.any():
            continue
        local = (prev.points[sel] - v0.position) @ _vehicle_rotation(v0)
        moved[sel] = local @ _vehicle_rotation(v1).T + v1.position
    sky = prev.obj == SKY
    cam = nxt.pose.to_camera(moved)
    # Points at infinity: only the rotation acts on their direction.
    cam[sky] = prev.rays[sky] @ nxt.pose.rotation
    uv, z = K.project(cam)
    grid_u, grid_v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    flow = np.stack([uv[..., 0] - grid_u, uv[..., 1] - grid_v], axis=-1)
    inside = ((z > 0.05) & (uv[..., 0] >= 0) & (uv[..., 0] <= W - 1)
              & (uv[..., 1] >= 0) & (uv[..., 1] <= H - 1))
    map_u = np.where(inside, uv[..., 0], -1).astype(np.float32)
    map_v = np.where(inside, uv[..., 1], -1).astype(np.float32)
    seen = cv2.remap(nxt.inv_depth, map_u, map_v, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    with np.errstate(divide='ignore', invalid='ignore'):
        expected = np.where(sky, 0.0, 1.0 / z)
    visible = np.abs(seen - expected) <= rel_tol * expected + abs_tol
    defined = (z > 0.05) & np.isfinite(flow).all(axis=-1)
    valid = inside & visible & defined
    # Flow stays dense where it is defined (also under occlusion); 0 where it is not.
    flow = np.where(defined[..., None], flow, 0.0)
    return flow.astype(np.float32), valid
