"""
Post-processing: model outputs back to the camera's resolution (pure: numpy + OpenCV).

Lane masks: the small logit map is resized (bilinear) to the region-of-interest box and
thresholded at ``logit(t)`` (no sigmoid per pixel: ``sigmoid(x) > t`` iff ``x > logit(t)``),
giving a 0/255 ``uint8`` mask at the frame's size, 0 outside the box. Flow: the (u, v) map is
resized to the box and each component scaled from model-input pixels to camera pixels
(``u * box_w / W_in``, ``v * box_h / H_in``, after ``flow_scale``); NaN outside the box (no
estimate there).
"""

import math

import cv2
import numpy as np


def logit(p: float) -> float:
    """Inverse sigmoid of a probability in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f'threshold {p} must be in (0, 1)')
    return math.log(p / (1.0 - p))


def score_threshold(threshold: float, kind: str) -> float:
    """Threshold on the model's output: ``logit(t)`` for logits, ``t`` for probabilities."""
    if kind == 'logits':
        return logit(threshold)
    if kind == 'probability':
        logit(threshold)   # range check
        return float(threshold)
    raise ValueError(f'output kind {kind!r} is not logits or probability')


def mask_from_scores(scores: np.ndarray, box, frame_hw, threshold: float) -> np.ndarray:
    """(h, w) float32 scores -> (H, W) uint8 mask, 255 where the resized score > threshold."""
    height, width = frame_hw
    scores = np.asarray(scores, np.float32)
    if scores.shape != (box.height, box.width):
        scores = cv2.resize(scores, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
    inside = cv2.compare(scores, float(threshold), cv2.CMP_GT)
    if (box.height, box.width) == (height, width):
        return inside
    mask = np.zeros((height, width), np.uint8)
    mask[box.top:box.bottom, box.left:box.right] = inside
    return mask


def flow_to_camera(flow: np.ndarray, box, frame_hw, input_hw, flow_scale: float = 1.0):
    """
    (2, h, w) model flow -> (H, W, 2) float32 camera pixels per frame.

    ``flow * flow_scale`` is in pixels at the model input (``input_hw``); the box is where
    that input came from in the frame.
    """
    height, width = frame_hw
    h_in, w_in = input_hw
    scale = np.array([flow_scale * box.width / w_in, flow_scale * box.height / h_in],
                     np.float32)
    # Scale the small map, then resize (bilinear resizing commutes with a per-channel scale).
    uv = np.asarray(flow, np.float32).transpose(1, 2, 0) * scale
    if uv.shape[:2] != (box.height, box.width):
        uv = cv2.resize(uv, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
    if (box.height, box.width) == (height, width):
        return uv
    out = np.full((height, width, 2), np.nan, np.float32)
    out[box.top:box.bottom, box.left:box.right] = uv
    return out
