"""
CARLA ground truth as lane_seg expects it: road-line masks and optical flow in pixels.

Pure numpy (and OpenCV for one resampling step); imports neither ``carla`` nor rclpy, so the
conversions are tested without a CARLA server.

Road lines
----------
CARLA's semantic camera writes the class tag in the red channel of a BGRA image (byte index 2
in memory). The road-line tag is **6 up to CARLA 0.9.13 and 24 from 0.9.14 on** (the UE5
0.10 series keeps 24); :func:`road_line_tag` picks it from the server's version string. The
CARLA ROS bridge publishes the CityScapes *palette* image instead of tags; road lines are RGB
(157, 234, 50) in both tag generations, i.e. bytes (50, 234, 157) in a ``bgr8``/``bgra8``
buffer, which :func:`palette_to_lane_mask` matches.

Optical flow
------------
``sensor.camera.optical_flow`` (servers from 0.9.12) gives, for each pixel of frame ``t``, two
float32 values in [-2, 2]. Our package convention is forward flow in pixels:
``flow[v, u] = (du, dv)`` such that pixel ``(u, v)`` of frame K moves to ``(u + du, v + dv)``
in frame K+1 (``u`` right, ``v`` down). Writing ``(x, y)`` for CARLA's two values at pixel
``p`` of frame ``t``, with image width ``W`` and height ``H``::

    m(p) = (x * W / 2, -y * H / 2)

is the motion, in pixels, of the surface point seen at ``p`` in frame ``t`` since frame
``t - 1``: it was at ``p - m(p)`` in frame ``t - 1``. The evidence:

* CARLA's ``OpticalFlowCamera.cpp`` decodes a post-process material built on Unreal's velocity
  buffer with ``x = (R - 0.5) * 4``, ``y = (G - 0.5) * 4``. Unreal stores there
  ``ScreenPos - PrevScreenPos`` (current minus previous position, in normalized device
  coordinates: the screen spans 2 units in x and in y, and y points up) in a "-2..2 screen
  space range" (``EncodeVelocityToTexture``). Two NDC units are ``W`` (or ``H``) pixels, hence
  the factor ``W / 2``; y up is image ``v`` down, hence the minus sign; current minus previous
  makes the field a displacement *from* ``t - 1`` *to* ``t``, sampled on frame ``t``'s grid.
* carla-simulator/carla#4795 ("Optical Flow Definition"): two users checked by warping
  frames that the pixel scaling is ``W / 2`` in x and ``-H / 2`` in y and that CARLA's field
  is best read as the backward flow ``t -> t - 1`` when negated (``(-x * W/2, +y * H/2)``),
  exactly ``-m`` above; #8492 uses the same scaling and #8276 warps frame ``t`` onto
  ``t - 1`` with it.
* CARLA's documentation only says values in [-2, 2] "can be scaled with the image size"
  (which, taken literally, would be a factor ``W``; the warping tests and the NDC definition
  both contradict that), and its ``get_color_coded_flow`` adds 180 degrees to the hue, which
  says nothing about units.

So CARLA gives the exact *backward* flow of frame ``t`` (``-m``, convention ``'backward'``).
The exact forward flow from ``t - 1`` to ``t`` lives on frame ``t - 1``'s grid and cannot be
derived exactly from this one field: pixels of ``t - 1`` that are occluded or leave the view
in ``t`` have no sample. Convention ``'forward'`` (the default) solves ``F(q) = m(q + F(q))``
by fixed-point iteration (bilinear sampling, ``iterations`` steps), exact up to interpolation
wherever the point stays visible; ``iterations=0`` returns ``m`` itself, the plain
"negated backward flow" approximation (error about ``|grad m| * |m|``). Both forward variants
are flagged ``exact=False`` in :data:`FLOW_CONVENTIONS`. The flow image of CARLA's frame
``t`` thus gives the ground truth of the pair (``t - 1``, ``t``); lane_seg's flow topics
(``flow_node``'s estimate and every ground truth) stamp a pair with its newer frame, the one
it is published with, although the forward flow lives on the older frame's grid, so
``carla_camera_node`` stamps it with frame ``t``. The velocity buffer spans one *server*
frame, so the pair is only a pair of camera frames when the camera captures every server tick
(synchronous mode).
"""

from dataclasses import dataclass
import re

import cv2
import numpy as np

ROAD_LINE_TAG_LEGACY = 6
ROAD_LINE_TAG = 24
ROAD_LINE_RGB = (157, 234, 50)
FIRST_VERSION_WITH_TAG_24 = (0, 9, 14)
FIRST_VERSION_WITH_OPTICAL_FLOW = (0, 9, 12)

_VERSION = re.compile(r'^v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[-+~][0-9A-Za-z.+~-]*)?$')


@dataclass(frozen=True)
class FlowConvention:
    """What :func:`carla_flow_to_pixels` returns for one ``convention`` name."""

    name: str
    exact: bool
    description: str


FLOW_CONVENTIONS = {
    'forward': FlowConvention(
        'forward', False,
        "forward flow from the previous frame to this one, pixels, on the previous frame's "
        "grid (lane_seg convention); inverted from CARLA's backward field by fixed-point "
        'iteration, approximate where points are occluded or leave the view'),
    'backward': FlowConvention(
        'backward', True,
        "backward flow from this frame to the previous one, pixels, on this frame's grid: "
        'pixel (u, v) of this frame was at (u + du, v + dv) in the previous frame'),
}


def flow_convention(name):
    """Return the :class:`FlowConvention` called ``name``; ValueError names the choices."""
    try:
        return FLOW_CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f'unknown flow convention {name!r}; choose one of {sorted(FLOW_CONVENTIONS)}'
        ) from None


def parse_carla_version(version):
    """
    Parse a CARLA version string into ``(major, minor, patch)``.

    Accepts what ``client.get_server_version()`` returns, e.g. ``'0.9.13'``,
    ``'0.9.15-dirty'``, ``'0.9.14-1-gabcdef'``, ``'0.10.0'``; a missing patch counts as 0.
    Anything else raises ValueError.
    """
    if not isinstance(version, str):
        raise ValueError(f'CARLA version must be a string like "0.9.16", got {version!r}')
    match = _VERSION.match(version.strip())
    if match is None:
        raise ValueError(
            f'cannot parse CARLA version {version!r}; expected "MAJOR.MINOR[.PATCH][-suffix]" '
            'such as "0.9.16"')
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def road_line_tag(server_version):
    """Road-line semantic tag of a CARLA server: 6 up to 0.9.13, 24 from 0.9.14 (and 0.10)."""
    if parse_carla_version(server_version) >= FIRST_VERSION_WITH_TAG_24:
        return ROAD_LINE_TAG
    return ROAD_LINE_TAG_LEGACY


def server_supports_optical_flow(version):
    """Whether a server of this version has ``sensor.camera.optical_flow`` (from 0.9.12)."""
    return parse_carla_version(version) >= FIRST_VERSION_WITH_OPTICAL_FLOW


def _uint8_image(image, name):
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f'{name} must be uint8, got {arr.dtype}')
    return arr


def semantic_raw_to_lane_mask(bgra, tag):
    """
    Lane mask (uint8, 255 on road lines, 0 elsewhere) from a raw CARLA semantic image.

    ``bgra`` is the sensor's raw (H, W, 4) uint8 image (or (H, W, 3)), the tag sitting in the
    red channel, index 2 in memory; an (H, W) array is taken as the tags themselves. ``tag`` is
    the road-line tag, normally :func:`road_line_tag` of the server version.
    """
    arr = _uint8_image(bgra, 'semantic image')
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag <= 255:
        raise ValueError(f'tag must be an integer in [0, 255], got {tag!r}')
    if arr.ndim == 2:
        tags = arr
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        tags = arr[..., 2]
    else:
        raise ValueError(
            f'semantic image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}')
    return np.where(tags == tag, np.uint8(255), np.uint8(0))


def palette_to_lane_mask(bgra_or_bgr, tolerance=0, channel_order='bgr'):
    """
    Lane mask (uint8, 255 on road lines) from a CityScapes palette image.

    This is what the CARLA ROS bridge publishes for its semantic camera (``bgra8``): road
    lines are RGB (157, 234, 50) whatever the server's tag numbering. ``bgra_or_bgr`` is an
    (H, W, 3) or (H, W, 4) uint8 array in ``channel_order`` (``'bgr'`` for ``bgr8``/``bgra8``
    buffers, ``'rgb'`` for ``rgb8``/``rgba8``); alpha is ignored. A pixel matches when every
    colour channel is within ``tolerance`` (0 to 255) of the road-line colour, which allows
    for lossy compression in recorded bags.
    """
    arr = _uint8_image(bgra_or_bgr, 'palette image')
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f'palette image must be (H, W, 3) or (H, W, 4), got {arr.shape}')
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) \
            or not 0 <= tolerance <= 255:
        raise ValueError(f'tolerance must be an integer in [0, 255], got {tolerance!r}')
    if channel_order == 'bgr':
        colour = ROAD_LINE_RGB[::-1]
    elif channel_order == 'rgb':
        colour = ROAD_LINE_RGB
    else:
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    rgb = arr[..., :3]
    if tolerance == 0:
        match = np.all(rgb == np.asarray(colour, np.uint8), axis=-1)
    else:
        diff = np.abs(rgb.astype(np.int16) - np.asarray(colour, np.int16))
        match = np.all(diff <= tolerance, axis=-1)
    return np.where(match, np.uint8(255), np.uint8(0))


def _raw_flow_array(raw, width, height):
    for name, value in (('width', width), ('height', height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if isinstance(raw, np.ndarray):
        arr = raw
    else:
        # A buffer such as carla.OpticalFlowImage.raw_data: float32 pairs, row-major.
        arr = np.frombuffer(raw, dtype=np.float32)
    if arr.dtype != np.float32:
        raise ValueError(f'CARLA flow must be float32, got {arr.dtype}')
    if arr.ndim == 1:
        if arr.size != height * width * 2:
            raise ValueError(
                f'CARLA flow buffer holds {arr.size} floats, expected '
                f'height*width*2 = {height}*{width}*2 = {height * width * 2}')
        arr = arr.reshape(height, width, 2)
    if arr.shape != (height, width, 2):
        raise ValueError(f'CARLA flow must have shape ({height}, {width}, 2), got {arr.shape}')
    if not np.all(np.isfinite(arr)):
        raise ValueError('CARLA flow contains NaN or infinite values')
    return arr


def carla_flow_to_pixels(raw, width, height, convention='forward', iterations=3,
                         out_of_view=None):
    """
    Convert a CARLA optical-flow image to float32 (H, W, 2) flow in pixels.

    ``raw`` is the (H, W, 2) float32 array of ``sensor.camera.optical_flow`` values in
    [-2, 2], or its raw buffer (``image.raw_data``). ``convention`` is one of
    :data:`FLOW_CONVENTIONS`:

    * ``'forward'`` (lane_seg's convention): ``flow[v, u] = (du, dv)`` moves pixel ``(u, v)`` of
      the previous frame to ``(u + du, v + dv)`` in this one. Approximate (see the module
      docstring): ``iterations`` fixed-point steps, 0 giving the negated backward flow.
    * ``'backward'``: exact; pixel ``(u, v)`` of this frame was at ``(u + du, v + dv)`` in the
      previous frame.

    ``out_of_view`` (e.g. ``np.nan``, as lane_seg's ground-truth flow marks invalid pixels)
    replaces both components where ``(u + du, v + dv)`` falls outside the image; ``None``
    keeps the values there.
    """
    info = flow_convention(convention)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or not 0 <= iterations <= 50:
        raise ValueError(f'iterations must be an integer in [0, 50], got {iterations!r}')
    arr = _raw_flow_array(raw, width, height)
    motion = np.empty((height, width, 2), np.float32)
    motion[..., 0] = arr[..., 0] * np.float32(width * 0.5)
    motion[..., 1] = arr[..., 1] * np.float32(-height * 0.5)
    grid_u, grid_v = np.meshgrid(np.arange(width, dtype=np.float32),
                                 np.arange(height, dtype=np.float32))
    if info.name == 'backward':
        flow = -motion
    else:
        flow = motion
        for _ in range(int(iterations)):
            flow = cv2.remap(motion, grid_u + flow[..., 0], grid_v + flow[..., 1],
                             cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if out_of_view is not None:
        u, v = grid_u + flow[..., 0], grid_v + flow[..., 1]
        outside = (u < 0) | (u > width - 1) | (v < 0) | (v > height - 1)
        flow[outside] = out_of_view
    return flow.astype(np.float32, copy=False)
