"""
Accuracy metrics shared by training, evaluation, benchmarks and bag replay (pure numpy).

Lane metrics work on boolean (or 0/non-zero) masks of the same shape: a pixel is a lane pixel
when it is non-zero, so ``mono8`` masks with 0/255 and instance-id masks both work as they are.
Flow metrics work on (H, W, 2) arrays in pixels; ``valid`` (H, W) selects the pixels that count,
and pixels whose ground truth is not finite never count.  A non-finite *prediction* on a valid
pixel is an error, never silently dropped: it makes :func:`epe` ``inf`` or ``nan`` and counts
as an outlier in :func:`fl_all`.

Conventions for empty inputs: two empty lane masks agree perfectly (IoU = F1 = 1.0); flow with
no valid pixel has no error to report (``nan``).  Pooling over a sequence: sum the counts from
:func:`lane_counts` (or weight per-frame EPE by :func:`flow_valid_count`) rather than averaging
per-frame ratios when a data-set-wide number is wanted.
"""

import numpy as np

KITTI_OUTLIER_PX = 3.0
KITTI_OUTLIER_REL = 0.05


def _pair(pred, gt):
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f'prediction shape {pred.shape} != ground truth shape {gt.shape}')
    return pred != 0, gt != 0


def lane_counts(pred, gt):
    """
    Return ``(tp, fp, fn)`` lane-pixel counts of a prediction against the ground truth.

    Both masks must have the same shape; non-zero means lane.
    """
    p, g = _pair(pred, gt)
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def iou_from_counts(tp, fp, fn):
    """Intersection over union from counts; 1.0 when both masks are empty."""
    union = tp + fp + fn
    return 1.0 if union == 0 else tp / union


def f1_from_counts(tp, fp, fn):
    """Pixel F1 (Dice) from counts; 1.0 when both masks are empty."""
    total = 2 * tp + fp + fn
    return 1.0 if total == 0 else 2 * tp / total


def lane_iou(pred, gt):
    """
    Binary intersection over union of lane pixels.

    ``|pred & gt| / |pred | gt|``; 1.0 when neither mask has a lane pixel.
    """
    return iou_from_counts(*lane_counts(pred, gt))


def lane_f1(pred, gt):
    """
    Pixel-level F1 (Dice) of lane pixels: ``2 tp / (2 tp + fp + fn)``.

    This is the harmonic mean of pixel precision and recall, not CULane's per-lane F1 (which
    matches whole lanes at IoU 0.5); 1.0 when neither mask has a lane pixel.
    """
    return f1_from_counts(*lane_counts(pred, gt))


def _flow_error(flow, gt, valid):
    flow = np.asarray(flow)
    gt = np.asarray(gt)
    if flow.shape != gt.shape or flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f'flow shapes must be equal (H, W, 2): got {flow.shape} and {gt.shape}')
    mask = np.isfinite(gt).all(axis=2)
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != gt.shape[:2]:
            raise ValueError(f'valid shape {valid.shape} != flow shape {gt.shape[:2]}')
        mask &= valid != 0
    diff = flow[mask].astype(np.float64) - gt[mask].astype(np.float64)
    err = np.sqrt((diff * diff).sum(axis=1))
    return err, gt[mask].astype(np.float64)


def flow_valid_count(gt, valid=None):
    """Count the pixels :func:`epe` / :func:`fl_all` use (valid, with finite ground truth)."""
    gt = np.asarray(gt)
    mask = np.isfinite(gt).all(axis=-1)
    if valid is not None:
        mask &= np.asarray(valid) != 0
    return int(np.count_nonzero(mask))


def epe(flow, gt, valid=None):
    """
    Mean end-point error in pixels over valid pixels with finite ground truth.

    ``mean(||flow - gt||_2)``; ``nan`` when no pixel is valid.
    """
    err, _ = _flow_error(flow, gt, valid)
    return float(err.mean()) if err.size else float('nan')


def fl_all(flow, gt, valid=None):
    """
    KITTI 2015 outlier rate (Fl-all) as a fraction in [0, 1].

    A valid pixel is an outlier when its end-point error exceeds both 3 px and 5 % of the
    ground-truth magnitude; a non-finite prediction is an outlier.  ``nan`` when no pixel is
    valid.
    """
    err, g = _flow_error(flow, gt, valid)
    if not err.size:
        return float('nan')
    mag = np.sqrt((g * g).sum(axis=1))
    outlier = ~np.isfinite(err) | ((err > KITTI_OUTLIER_PX) & (err > KITTI_OUTLIER_REL * mag))
    return float(np.count_nonzero(outlier)) / err.size
