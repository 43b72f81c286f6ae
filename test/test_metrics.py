"""Lane and flow metrics on small hand-checked arrays."""

import math

from lane_seg.metrics import (epe, f1_from_counts, fl_all, flow_valid_count, iou_from_counts,
                              lane_counts, lane_f1, lane_iou)
import numpy as np
import pytest


def test_lane_iou_and_f1_by_hand():
    gt = np.zeros((4, 5), np.uint8)
    pred = np.zeros((4, 5), np.uint8)
    gt[1, 0:4] = 255          # 4 lane pixels
    pred[1, 2:5] = 1          # 3 predicted, 2 of them right
    assert lane_counts(pred, gt) == (2, 1, 2)
    assert lane_iou(pred, gt) == pytest.approx(2 / 5)
    assert lane_f1(pred, gt) == pytest.approx(4 / 7)
    assert lane_iou(gt, gt) == 1.0 and lane_f1(gt > 0, gt) == 1.0


def test_instance_ids_and_bools_count_as_lane():
    ids = np.array([[0, 1, 2], [3, 0, 0]], np.uint8)
    assert lane_iou(ids > 0, ids * 80) == 1.0


def test_empty_masks_agree_and_disjoint_masks_score_zero():
    empty = np.zeros((3, 3), bool)
    assert lane_iou(empty, empty) == 1.0 and lane_f1(empty, empty) == 1.0
    one = empty.copy()
    one[0, 0] = True
    assert lane_iou(one, empty) == 0.0 and lane_f1(empty, one) == 0.0
    assert iou_from_counts(0, 0, 0) == 1.0 and f1_from_counts(3, 1, 0) == pytest.approx(6 / 7)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match='shape'):
        lane_iou(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match='shapes'):
        epe(np.zeros((2, 3, 2)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match='valid shape'):
        epe(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), np.ones((3, 2), bool))


def test_epe_over_valid_pixels_only():
    gt = np.zeros((2, 2, 2), np.float32)
    flow = gt.copy()
    flow[0, 0] = (3.0, 4.0)      # error 5
    flow[1, 1] = (100.0, 0.0)    # error 100 but invalid
    valid = np.array([[1, 1], [1, 0]], np.uint8)
    assert epe(flow, gt, valid) == pytest.approx(5 / 3)
    assert epe(flow, gt) == pytest.approx(105 / 4)
    assert epe(gt, gt, valid) == 0.0
    assert flow_valid_count(gt, valid) == 3


def test_nan_ground_truth_does_not_count_but_nan_prediction_does():
    gt = np.zeros((1, 3, 2), np.float32)
    gt[0, 2] = np.nan
    flow = np.zeros_like(gt)
    flow[0, 0] = (0.0, 2.0)
    assert epe(flow, gt) == pytest.approx(1.0)
    assert flow_valid_count(gt) == 2
    flow[0, 1] = np.nan
    assert math.isnan(epe(flow, gt))
    assert fl_all(flow, gt) == pytest.approx(0.5)   # the NaN pixel is an outlier


def test_no_valid_pixel_gives_nan():
    gt = np.zeros((2, 2, 2), np.float32)
    assert math.isnan(epe(gt, gt, np.zeros((2, 2), bool)))
    assert math.isnan(fl_all(gt, gt, np.zeros((2, 2), bool)))


def test_fl_all_needs_both_absolute_and_relative_error():
    gt = np.zeros((1, 4, 2), np.float32)
    gt[0, :, 0] = [0.0, 100.0, 100.0, 10.0]
    flow = gt.copy()
    flow[0, 0, 0] += 3.5     # > 3 px and > 5 % of 0: outlier
    flow[0, 1, 0] += 4.0     # > 3 px but < 5 % of 100: inlier
    flow[0, 2, 0] += 6.0     # > 3 px and > 5 % of 100: outlier
    flow[0, 3, 0] += 2.9     # < 3 px: inlier
    assert fl_all(flow, gt) == pytest.approx(0.5)
    assert fl_all(gt, gt) == 0.0
