"""
Pre-processing shared by training, evaluation, engines and nodes, driven by model metadata.

A camera frame (any supported encoding, any size) becomes the model's input tensor: crop the
region of interest, resize to the model's input size, reorder colours, normalize, NCHW.
Training uses the very same functions, so a model sees identical tensors in both worlds.
"""

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_ROI = {'top': 0.0, 'bottom': 1.0, 'left': 0.0, 'right': 1.0}


@dataclass(frozen=True)
class RoiBox:
    """Pixel box of the region of interest in a camera frame (half-open rows/cols)."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


def roi_box(height: int, width: int, roi=None) -> RoiBox:
    """Region of interest (fractions of the frame) as pixels; at least one pixel each way."""
    roi = roi or DEFAULT_ROI
    top = int(round(roi['top'] * height))
    bottom = max(top + 1, int(round(roi['bottom'] * height)))
    left = int(round(roi['left'] * width))
    right = max(left + 1, int(round(roi['right'] * width)))
    return RoiBox(top, min(bottom, height), left, min(right, width))


def to_bgr(image: np.ndarray, encoding: str) -> np.ndarray:
    """Any supported 8-bit colour or mono encoding to a contiguous BGR uint8 image."""
    if encoding == 'bgr8':
        return image
    if encoding == 'rgb8':
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if encoding == 'bgra8':
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if encoding == 'rgba8':
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGR)
    if encoding == 'mono8':
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    raise ValueError(f'cannot use {encoding!r} images; supported: bgr8, rgb8, bgra8, rgba8, mono8')


def normalize(image_bgr: np.ndarray, meta: dict) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (3, H, W) float32 in the model's colour order and scaling."""
    norm = meta['normalization']
    img = image_bgr if meta['color_order'] == 'BGR' else image_bgr[..., ::-1]
    scale = np.float32(norm['scale'])
    mean = np.asarray(norm['mean'], np.float32)
    std = np.asarray(norm['std'], np.float32)
    # (x * scale - mean) / std == x * a + b, one fused pass.
    a = scale / std
    b = -mean / std
    out = img.astype(np.float32) * a + b
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def prepare(image: np.ndarray, meta: dict, encoding: str = 'bgr8',
            interpolation=cv2.INTER_AREA):
    """
    Camera frame -> (model input (3, h, w) float32, RoiBox in frame pixels).

    ``meta`` is the model metadata: ``roi`` (lane models), input size, colour order and
    normalization. Any frame size works; the ROI is resized to the model's input size.
    """
    h_in, w_in = meta['inputs'][0]['shape'][2:]
    box = roi_box(image.shape[0], image.shape[1], meta.get('roi'))
    crop = image[box.top:box.bottom, box.left:box.right]
    if crop.shape[0] != h_in or crop.shape[1] != w_in:
        crop = cv2.resize(crop, (w_in, h_in), interpolation=interpolation)
    bgr = to_bgr(crop, encoding)
    return normalize(bgr, meta), box
