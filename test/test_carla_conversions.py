"""CARLA ground-truth conversions on constructed values (no CARLA server, no rclpy)."""

from lane_seg.carla import conversions as cc
import numpy as np
import pytest

W, H = 64, 48


@pytest.mark.parametrize('version, tag', [
    ('0.9.10', 6), ('0.9.12', 6), ('0.9.13', 6), ('0.9.13-dirty', 6),
    ('0.9.14', 24), ('0.9.15-dirty', 24), ('0.9.15.2', 24), ('0.9.16', 24),
    ('0.9.14-1-g0123abc', 24), (' 0.9.16\n', 24), ('0.10.0', 24), ('0.10', 24), ('1.0.0', 24),
])
def test_road_line_tag_by_version(version, tag):
    assert cc.road_line_tag(version) == tag


@pytest.mark.parametrize('garbage', ['', 'carla', '0', '0.9.x', 'latest', '0.9.16 dirty',
                                     None, 13, b'0.9.13'])
def test_road_line_tag_rejects_garbage(garbage):
    with pytest.raises(ValueError, match='CARLA version'):
        cc.road_line_tag(garbage)


def test_parse_version_compares_numerically():
    assert cc.parse_carla_version('0.10.0') > cc.parse_carla_version('0.9.16')
    assert cc.parse_carla_version('0.9.9') < cc.parse_carla_version('0.9.13')
    assert cc.parse_carla_version('0.9.15-dirty') == (0, 9, 15)


@pytest.mark.parametrize('version, supported', [
    ('0.9.11', False), ('0.9.12', True), ('0.9.13', True), ('0.9.16', True), ('0.10.0', True),
])
def test_optical_flow_support(version, supported):
    assert cc.server_supports_optical_flow(version) is supported


def _semantic(tags):
    """Raw CARLA semantic BGRA image: the tag in the red channel (index 2), noise elsewhere."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=tags.shape + (4,), dtype=np.uint8)
    img[..., 2] = tags
    return img


def test_semantic_raw_mask_uses_red_channel_and_tag():
    tags = np.zeros((H, W), np.uint8)
    tags[10:12, :] = 6
    tags[20:22, :] = 24
    img = _semantic(tags)
    img[30, 5, 0] = 24  # a 24 in the blue channel is not a road line
    old = cc.semantic_raw_to_lane_mask(img, cc.road_line_tag('0.9.13'))
    new = cc.semantic_raw_to_lane_mask(img, cc.road_line_tag('0.9.16'))
    assert old.dtype == np.uint8 and old.shape == (H, W)
    assert set(np.unique(old)) == {0, 255}
    np.testing.assert_array_equal(old == 255, tags == 6)
    np.testing.assert_array_equal(new == 255, tags == 24)
    np.testing.assert_array_equal(cc.semantic_raw_to_lane_mask(img[..., :3], 24), new)
    np.testing.assert_array_equal(cc.semantic_raw_to_lane_mask(tags, 24), new)


@pytest.mark.parametrize('bad, tag', [
    (np.zeros((4, 4, 2), np.uint8), 24), (np.zeros((4, 4, 4), np.float32), 24),
    (np.zeros((4, 4, 4), np.uint8), 256), (np.zeros((4, 4, 4), np.uint8), -1),
    (np.zeros((4, 4, 4), np.uint8), 6.0), (np.zeros((4, 4, 4), np.uint8), True),
])
def test_semantic_raw_mask_rejects_bad_input(bad, tag):
    with pytest.raises(ValueError):
        cc.semantic_raw_to_lane_mask(bad, tag)


def test_palette_mask_matches_road_line_colour_in_bgr_memory_order():
    img = np.zeros((H, W, 4), np.uint8)
    img[..., 3] = 255
    img[5, :, :3] = (50, 234, 157)        # road line, B G R in memory
    img[6, :, :3] = (157, 234, 50)        # the same bytes in RGB order: not a road line here
    img[7, :, :3] = (128, 64, 128)        # road (CityScapes purple)
    img[8, :, :3] = (52, 232, 157)        # road line after lossy compression
    mask = cc.palette_to_lane_mask(img)
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    rows = np.flatnonzero(mask.any(axis=1))
    assert list(rows) == [5]
    assert np.all(mask[5] == 255)
    assert list(np.flatnonzero(cc.palette_to_lane_mask(img, tolerance=2).any(axis=1))) == [5, 8]
    np.testing.assert_array_equal(cc.palette_to_lane_mask(img[..., :3]), mask)
    rgb = np.ascontiguousarray(img[..., 2::-1])
    np.testing.assert_array_equal(cc.palette_to_lane_mask(rgb, channel_order='rgb'), mask)


def test_palette_mask_agrees_with_raw_tags_for_both_tag_generations():
    tags = np.zeros((H, W), np.uint8)
    tags[::7, :] = 1
    for version in ('0.9.13', '0.9.16'):
        tag = cc.road_line_tag(version)
        tags_v = tags * tag
        palette = np.zeros((H, W, 4), np.uint8)
        palette[tags_v == tag, :3] = cc.ROAD_LINE_RGB[::-1]
        np.testing.assert_array_equal(cc.palette_to_lane_mask(palette),
                                      cc.semantic_raw_to_lane_mask(_semantic(tags_v), tag))


@pytest.mark.parametrize('kwargs', [{'tolerance': -1}, {'tolerance': 256},
                                    {'tolerance': 1.5}, {'channel_order': 'hsv'}])
def test_palette_mask_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        cc.palette_to_lane_mask(np.zeros((4, 4, 3), np.uint8), **kwargs)


def _raw_from_motion(motion, width, height):
    """Encode a motion field as CARLA does (pixels, t-1 -> t, on frame t's grid)."""
    raw = np.empty(motion.shape, np.float32)
    raw[..., 0] = motion[..., 0] / (width / 2)
    raw[..., 1] = -motion[..., 1] / (height / 2)
    return raw


def test_flow_scaling_and_signs_for_a_pure_translation():
    # Everything moved 4 px right and 6 px up between the frames: CARLA writes x = 4 / (W/2)
    # and y = +6 / (H/2) (normalized device coordinates, y up).
    raw = np.zeros((H, W, 2), np.float32)
    raw[..., 0] = 4 / (W / 2)
    raw[..., 1] = 6 / (H / 2)
    forward = cc.carla_flow_to_pixels(raw, W, H)
    assert forward.dtype == np.float32 and forward.shape == (H, W, 2)
    np.testing.assert_allclose(forward[..., 0], 4, atol=1e-4)
    np.testing.assert_allclose(forward[..., 1], -6, atol=1e-4)
    backward = cc.carla_flow_to_pixels(raw, W, H, convention='backward')
    np.testing.assert_allclose(backward, -forward, atol=1e-4)
    np.testing.assert_allclose(cc.carla_flow_to_pixels(raw, W, H, iterations=0), forward,
                               atol=1e-4)


def test_flow_accepts_the_raw_buffer():
    raw = np.random.default_rng(1).uniform(-0.1, 0.1, (H, W, 2)).astype(np.float32)
    from_buffer = cc.carla_flow_to_pixels(memoryview(raw.tobytes()), W, H, 'backward')
    np.testing.assert_array_equal(from_buffer, cc.carla_flow_to_pixels(raw, W, H, 'backward'))


def test_forward_flow_inverts_a_zoom_where_the_naive_negation_is_off():
    # Forward flow of a zoom about c: F(q) = a (q - c) on frame K's grid. Pixel p of frame K+1
    # came from q = (p + a c) / (1 + a), so CARLA's motion field there is a (p - c) / (1 + a).
    width, height, a = 160, 120, 0.05
    c = np.array([width / 2, height / 2])
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    grid = np.stack([u, v], axis=-1)
    raw = _raw_from_motion(a * (grid - c) / (1 + a), width, height)
    expected = a * (grid - c)
    lands = grid + expected
    inside = ((lands[..., 0] >= 0) & (lands[..., 0] <= width - 1)
              & (lands[..., 1] >= 0) & (lands[..., 1] <= height - 1))
    forward = cc.carla_flow_to_pixels(raw, width, height)
    naive = cc.carla_flow_to_pixels(raw, width, height, iterations=0)
    forward_err = np.linalg.norm(forward - expected, axis=-1)[inside]
    naive_err = np.linalg.norm(naive - expected, axis=-1)[inside]
    assert forward_err.max() < 0.02
    assert naive_err.max() > 0.1
    # The backward convention is exact: pixel p of frame K+1 was at p + b(p) in frame K.
    backward = cc.carla_flow_to_pixels(raw, width, height, convention='backward')
    np.testing.assert_allclose(grid + backward, (grid + a * c) / (1 + a), atol=1e-3)


def test_forward_flow_warps_frame_k_onto_frame_k_plus_1():
    # Constructed frames: a textured frame K, and frame K+1 that is frame K moved 3 px right
    # and 2 px down; sampling frame K+1 at q + F(q) must give frame K back.
    import cv2
    rng = np.random.default_rng(2)
    frame_k = cv2.GaussianBlur(rng.uniform(0, 255, (H, W)).astype(np.float32), (0, 0), 2)
    shift = np.float32([[1, 0, 3], [0, 1, 2]])
    frame_k1 = cv2.warpAffine(frame_k, shift, (W, H), borderMode=cv2.BORDER_REFLECT)
    motion = np.zeros((H, W, 2))
    motion[..., 0], motion[..., 1] = 3, 2
    flow = cc.carla_flow_to_pixels(_raw_from_motion(motion, W, H), W, H)
    u, v = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    warped = cv2.remap(frame_k1, u + flow[..., 0], v + flow[..., 1], cv2.INTER_LINEAR)
    np.testing.assert_allclose(warped[5:-5, 5:-5], frame_k[5:-5, 5:-5], atol=0.05)


def test_flow_conventions_are_flagged():
    assert cc.flow_convention('forward').exact is False
    assert cc.flow_convention('backward').exact is True
    with pytest.raises(ValueError, match='forward'):
        cc.flow_convention('sideways')


@pytest.mark.parametrize('raw, width, height, kwargs, match', [
    (np.zeros((H, W, 2), np.float64), W, H, {}, 'float32'),
    (np.zeros((H, W, 3), np.float32), W, H, {}, 'shape'),
    (np.zeros((H, W, 2), np.float32), W + 1, H, {}, 'shape'),
    (np.zeros(10, np.float32), W, H, {}, 'floats'),
    (np.full((H, W, 2), np.nan, np.float32), W, H, {}, 'NaN'),
    (np.zeros((H, W, 2), np.float32), 0, H, {}, 'width'),
    (np.zeros((H, W, 2), np.float32), W, H, {'convention': 'carla'}, 'convention'),
    (np.zeros((H, W, 2), np.float32), W, H, {'iterations': -1}, 'iterations'),
])
def test_flow_rejects_bad_input(raw, width, height, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cc.carla_flow_to_pixels(raw, width, height, **kwargs)


def test_conversions_import_neither_carla_nor_rclpy():
    import subprocess
    import sys
    code = ('import sys, lane_seg.carla.conversions; '
            'print(sorted(m for m in ("carla", "rclpy") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == '[]'


def test_out_of_view_marks_points_that_leave_the_image():
    motion = np.zeros((H, W, 2))
    motion[..., 0] = 3.0                       # everything moves 3 px right
    raw = _raw_from_motion(motion, W, H)
    forward = cc.carla_flow_to_pixels(raw, W, H, out_of_view=np.nan)
    assert np.isnan(forward[:, -3:]).all() and np.isfinite(forward[:, :-3]).all()
    backward = cc.carla_flow_to_pixels(raw, W, H, 'backward', out_of_view=np.nan)
    assert np.isnan(backward[:, :3]).all() and np.isfinite(backward[:, 3:]).all()
    kept = cc.carla_flow_to_pixels(raw, W, H)
    assert np.isfinite(kept).all()
