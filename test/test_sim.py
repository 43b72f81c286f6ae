"""The synthetic drive's ground truth is exact: flow, lane masks, determinism."""

import math

import cv2
from lane_seg.sim import CameraConfig, DriveConfig, Intrinsics, SyntheticDrive, WorldConfig
import numpy as np
import pytest

SIZE = (128, 256)


def _drive(seed, size=SIZE, noise=0.0, **world):
    cfg = DriveConfig(seed=seed, camera=CameraConfig(width=size[1], height=size[0]),
                      world=WorldConfig(seed=seed, **world), noise_std=noise)
    return SyntheticDrive(cfg)


def _warp_errors(frame, nxt, flow):
    """Per-pixel mean abs error between frame K and frame K+1 sampled at x + flow."""
    h, w = flow.shape[:2]
    gu, gv = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    warped = cv2.remap(nxt.image.astype(np.float32), gu + flow[..., 0], gv + flow[..., 1],
                       cv2.INTER_LINEAR)
    return np.abs(warped - frame.image.astype(np.float32)).mean(axis=-1)


# Motions: plain, sharp turns, steep grades with crests, frequent lane changes, dense traffic.
MOTIONS = {
    'plain': {},
    'turns': {'max_curvature': 1 / 90.0},
    'slopes': {'max_grade': 0.09},
    'lane_changes': {'lane_change_interval_s': (0.3, 0.6), 'lanes': 4},
    'traffic': {'vehicles': 10},
}


@pytest.mark.parametrize('motion', sorted(MOTIONS))
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_flow_warps_next_frame_onto_current(motion, seed):
    drive = _drive(seed, size=(256, 512), **MOTIONS[motion])
    frames = list(drive.frames(3, start=25 + 7 * seed))
    for frame, nxt in zip(frames, frames[1:]):
        assert frame.flow_valid.mean() > 0.5
        # Pixels that move (the static sky is trivially reproduced by either flow).
        valid = frame.flow_valid & (np.linalg.norm(frame.flow, axis=-1) > 1.0)
        assert valid.mean() > 0.2
        err = _warp_errors(frame, nxt, frame.flow)[valid].mean()
        zero = _warp_errors(frame, nxt, np.zeros_like(frame.flow))[valid].mean()
        assert err < 0.5 * zero, (motion, seed, err, zero)
        # The exact flow is a minimum: every half-pixel shift is worse, on average clearly.
        shifted = [_warp_errors(frame, nxt, frame.flow + np.array(shift, np.float32))[valid]
                   .mean() for shift in ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5))]
        assert min(shifted) > err and np.mean(shifted) > 1.2 * err, (shifted, err)


def test_motions_really_happen():
    turns = [f.ego.yaw for f in _drive(4, **MOTIONS['turns']).frames(40, start=0)]
    assert np.ptp(turns) > 0.05
    slopes = [f.ego.pitch for f in _drive(4, **MOTIONS['slopes']).frames(40, start=100)]
    assert max(abs(p) for p in slopes) > 0.01
    offsets = [f.ego.d for f in _drive(4, **MOTIONS['lane_changes']).frames(60, start=0)]
    assert np.ptp(offsets) > 2.5   # at least one lane change of about a lane width


def test_moving_vehicles_have_their_own_flow():
    """Vehicle pixels that move in the image are reproduced by warping with their flow."""
    errs, zeros = [], []
    for seed in range(1, 8):
        frame, nxt = _drive(seed, size=(192, 384), vehicles=10).frames(2, start=30)
        moving = np.linalg.norm(frame.flow, axis=-1) > 1.0
        veh = (frame.object_ids > 0) & frame.flow_valid & moving
        if veh.sum() < 150:
            continue
        err = _warp_errors(frame, nxt, frame.flow)[veh]
        zero = _warp_errors(frame, nxt, np.zeros_like(frame.flow))[veh]
        assert err.mean() < zero.mean(), seed
        errs.append(err)
        zeros.append(zero)
    assert len(errs) >= 3, 'too few frames with moving vehicles in view'
    assert np.concatenate(errs).mean() < 0.5 * np.concatenate(zeros).mean()


def test_occlusion_and_out_of_view_are_invalid():
    drive = _drive(5, size=(128, 256))
    frame = drive.frame(10)
    # The bottom rows leave the view as the car drives forward.
    assert not frame.flow_valid[-1].any()
    assert frame.flow_valid[64:].any()
    assert frame.flow.dtype == np.float32 and np.isfinite(frame.flow).all()


def test_lane_mask_lies_on_rendered_markings():
    for seed in range(6):
        drive = _drive(seed, size=(256, 512))
        frame = drive.frame(15)
        lanes = frame.lane_mask
        paint = (frame.marking_mask > 0) & (frame.inv_depth > 1 / 80.0)
        assert paint.sum() > 200
        near_lane = cv2.dilate((lanes > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert (paint & near_lane).sum() >= 0.95 * paint.sum(), seed
        # Conversely, the solid outer boundaries' pixels sit on paint (near field, no cars).
        near_paint = cv2.dilate(frame.marking_mask, np.ones((7, 7), np.uint8)) > 0
        region = (frame.inv_depth > 1 / 25.0) & (frame.object_ids == 0)
        for boundary in (1, drive.road.lanes + 1):
            mine = (lanes == boundary) & region
            if mine.sum() < 50:
                continue
            wear = drive.road.boundaries[boundary - 1].wear
            assert (mine & near_paint).sum() >= (0.85 - wear) * mine.sum(), (seed, boundary)


def test_lane_mask_ids_and_width():
    drive = _drive(3, size=(256, 512), lanes=3)
    frame = drive.frame(5)
    ids = set(np.unique(frame.lane_mask).tolist())
    assert ids <= {0, 1, 2, 3, 4} and len(ids) >= 3
    # Fixed pixel width: a near-field row crosses each boundary with a run of ~width pixels.
    width = drive.renderer.lane_width_px
    row = frame.lane_mask[-20]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row > 0, 0])))[::2]
    assert runs.size >= 1 and np.all(runs >= width - 2)


def test_same_seed_same_frames_and_seek():
    a = list(_drive(9, noise=1.0).frames(4))
    b = list(_drive(9, noise=1.0).frames(4))
    for fa, fb in zip(a, b):
        assert np.array_equal(fa.image, fb.image)
        assert np.array_equal(fa.lane_mask, fb.lane_mask)
        assert np.array_equal(fa.flow, fb.flow)
    drive = _drive(9, noise=1.0)
    assert np.array_equal(drive.frame(3).image, a[3].image)
    assert np.array_equal(drive.frame(1).image, a[1].image)   # going backwards replays


def test_different_seeds_differ():
    a = _drive(1).frame(0)
    b = _drive(2).frame(0)
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 5


def test_carla_default_intrinsics():
    k = Intrinsics.from_config(CameraConfig())
    assert (k.width, k.height) == (800, 600)
    assert k.fx == pytest.approx(400.0) and k.cx == 400.0 and k.cy == 300.0
    assert math.degrees(2 * math.atan(k.width / 2 / k.fx)) == pytest.approx(90.0)


@pytest.mark.parametrize('bad', [{'lanes': 5}, {'weather': 'snow'}, {'max_grade': 0.5},
                                 {'vehicles': -1}])
def test_world_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


@pytest.mark.parametrize('weather', ['clear', 'dusk', 'fog', 'wet', 'overcast'])
def test_every_weather_renders(weather):
    frame = _drive(2, size=(64, 128), noise=1.0, weather=weather).frame(0)
    assert frame.weather == weather
    assert frame.image.dtype == np.uint8 and frame.image.shape == (64, 128, 3)
    assert 20 < frame.image.mean() < 240
