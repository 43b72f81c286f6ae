"""Flow visualisation with the Middlebury colour wheel (Baker et al., IJCV 2011)."""

import numpy as np

UNKNOWN_FLOW = 1e9
# Wheel segments R->Y->G->C->B->M->R: (length, channel held at 255, channel ramped, rising).
SEGMENTS = ((15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True),
            (11, 2, 1, False), (13, 2, 0, True), (6, 0, 2, False))


def make_color_wheel():
    """Return the Middlebury wheel as a float (55, 3) RGB table in 0..255."""
    blocks = []
    for count, held, ramped, rising in SEGMENTS:
        block = np.zeros((count, 3))
        ramp = np.floor(255 * np.arange(count) / count)
        block[:, held] = 255
        block[:, ramped] = ramp if rising else 255 - ramp
        blocks.append(block)
    return np.concatenate(blocks)


COLOR_WHEEL = make_color_wheel()


def _valid_mask(flow, valid):
    ok = np.isfinite(flow).all(axis=2) & (np.abs(flow) < UNKNOWN_FLOW).all(axis=2)
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != ok.shape:
            raise ValueError(f'valid shape {valid.shape} does not match flow {flow.shape}')
        ok &= valid
    return ok


def flow_to_color(flow, max_flow=None, valid=None):
    """
    Colour-code a (H, W, 2) flow field; return a uint8 BGR (H, W, 3) image.

    Hue is the flow direction and saturation its magnitude relative to ``max_flow`` (default:
    the largest magnitude among valid, finite pixels); zero flow is white, pixels beyond
    ``max_flow`` are darkened and invalid, NaN or unknown (>= 1e9) pixels are black.
    """
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f'flow must have shape (H, W, 2), got {flow.shape}')
    ok = _valid_mask(flow, valid)
    flow = np.where(ok[..., None], flow, 0.0)
    u, v = flow[..., 0], flow[..., 1]
    rad = np.hypot(u, v)
    if max_flow is None:
        max_flow = rad.max(initial=0.0)
    scale = 1.0 / max(float(max_flow), np.finfo(np.float32).eps)
    u, v, rad = u * scale, v * scale, rad * scale

    ncols = len(COLOR_WHEEL)
    angle = np.arctan2(-v, -u) / np.pi
    angle[angle == 1.0] = -1.0  # +x flow is wheel index 0 whatever the sign of a zero v
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % ncols
    f = (fk - k0)[..., None]
    col = ((1 - f) * COLOR_WHEEL[k0] + f * COLOR_WHEEL[k1]) / 255
    inside = (rad <= 1)[..., None]
    col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
    rgb = np.floor(255 * col).astype(np.uint8)
    rgb[~ok] = 0
    return np.ascontiguousarray(rgb[..., ::-1])


def color_wheel_legend(size=129):
    """Return a uint8 BGR (size, size, 3) legend: each pixel shows the flow from the centre."""
    if size < 3:
        raise ValueError(f'legend size must be at least 3, got {size}')
    centre = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    flow = np.dstack([(x - centre) / centre, (y - centre) / centre])
    inside = np.hypot(flow[..., 0], flow[..., 1]) <= 1
    return flow_to_color(flow, max_flow=1.0, valid=inside)
