"""Tests for lane_seg.data: the folder layout, CULane, TuSimple and KITTI flow readers."""

import json

import cv2
from lane_seg.data import CULaneDataset
from lane_seg.data import DatasetError
from lane_seg.data import FlowFolderDataset
from lane_seg.data import FolderWriter
from lane_seg.data import KittiFlowDataset
from lane_seg.data import LaneFolderDataset
from lane_seg.data import open_flow_dataset
from lane_seg.data import open_lane_dataset
from lane_seg.data import read_camera
from lane_seg.data import TuSimpleDataset
from lane_seg.flow import read_kitti_flow
from lane_seg.flow import write_kitti_flow
import numpy as np
import pytest
import yaml

H, W = 24, 32
CAMERA = {'width': W, 'height': H, 'fx': 20.5, 'fy': 20.5, 'cx': 15.5, 'cy': 11.5,
          'distortion': [0.1, -0.02, 0.0, 0.0, 0.0], 'frame_id': 'camera', 'source': 'test'}


def make_frames(count=4, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        flow = rng.standard_normal((H, W, 2)).astype(np.float32) * 5
        frames.append({
            'image': rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            'mask': rng.integers(0, 4, (H, W), dtype=np.uint8),
            'markings': (rng.random((H, W)) > 0.8) if index % 2 == 0 else None,
            'flow': flow if index < count - 1 else None,
            'flow_valid': rng.random((H, W)) > 0.2 if index < count - 2 else None,
        })
    frames[count - 2]['flow'][0, 0] = np.nan  # no flow_valid png: validity from the flow
    return frames


@pytest.fixture
def folder(tmp_path):
    frames = make_frames()
    writer = FolderWriter(tmp_path / 'set')
    writer.write_camera(CAMERA)
    for index, frame in enumerate(frames):
        writer.write(index, **frame)
    return tmp_path / 'set', frames


def test_folder_layout_on_disk(folder):
    root, _ = folder
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file())
    assert names == [
        'camera.yaml', 'flow/000000.flo', 'flow/000001.flo', 'flow/000002.flo',
        'flow_valid/000000.png', 'flow_valid/000001.png',
        'images/000000.png', 'images/000001.png', 'images/000002.png', 'images/000003.png',
        'markings/000000.png', 'markings/000002.png',
        'masks/000000.png', 'masks/000001.png', 'masks/000002.png', 'masks/000003.png',
    ]
    markings = cv2.imread(str(root / 'markings' / '000000.png'), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(markings).tolist()) == {0, 255}


def test_lane_folder_round_trip(folder):
    root, frames = folder
    dataset = LaneFolderDataset(root)
    assert len(dataset) == 4 and dataset.skipped == []
    for index, frame in enumerate(frames):
        item = dataset[index]
        assert item['name'] == f'{index:06d}'
        np.testing.assert_array_equal(item['image'], frame['image'])
        np.testing.assert_array_equal(item['mask'], frame['mask'])
        if frame['markings'] is None:
            assert 'markings' not in item
        else:
            np.testing.assert_array_equal(item['markings'], frame['markings'] * 255)
    binary = LaneFolderDataset(root, binary=True)[1]['mask']
    np.testing.assert_array_equal(binary, frames[1]['mask'] > 0)
    assert binary.dtype == np.uint8


def test_flow_folder_round_trip(folder):
    root, frames = folder
    dataset = FlowFolderDataset(root)
    assert len(dataset) == 3 and dataset.skipped == []
    for index in range(3):
        item = dataset[index]
        assert item['name'] == f'{index:06d}'
        np.testing.assert_array_equal(item['image1'], frames[index]['image'])
        np.testing.assert_array_equal(item['image2'], frames[index + 1]['image'])
        np.testing.assert_array_equal(item['flow'], frames[index]['flow'])
        assert item['valid'].dtype == bool
    np.testing.assert_array_equal(dataset[0]['valid'], frames[0]['flow_valid'])
    expected = np.ones((H, W), bool)
    expected[0, 0] = False
    np.testing.assert_array_equal(dataset[2]['valid'], expected)


def test_camera_round_trip(folder, tmp_path):
    root, _ = folder
    assert read_camera(root) == CAMERA
    FolderWriter(tmp_path / 'np').write_camera(
        {**CAMERA, 'fx': np.float32(20.5), 'width': np.int64(W)})
    assert read_camera(tmp_path / 'np')['fx'] == 20.5
    path = root / 'camera.yaml'
    path.write_text(yaml.safe_dump({'width': W, 'height': H, 'fx': 1.0}))
    with pytest.raises(DatasetError, match='fy, cx, cy') as info:
        read_camera(root)
    assert str(path) in str(info.value)
    path.write_text('width: [unclosed')
    with pytest.raises(DatasetError, match='camera.yaml'):
        read_camera(root)
    with pytest.raises(DatasetError, match='camera.yaml'):
        read_camera(tmp_path / 'nowhere')


def test_missing_mask_is_skipped(folder):
    root, _ = folder
    FolderWriter(root).write(7, image=np.zeros((H, W, 3), np.uint8))
    dataset = LaneFolderDataset(root)
    assert len(dataset) == 4
    assert [path for path, _ in dataset.skipped] == [str(root / 'images' / '000007.png')]


def test_flow_without_second_image_is_skipped(folder):
    root, _ = folder
    FolderWriter(root).write(9, image=np.zeros((H, W, 3), np.uint8),
                             flow=np.zeros((H, W, 2), np.float32))
    dataset = FlowFolderDataset(root)
    assert len(dataset) == 3
    assert dataset.skipped[0][0] == str(root / 'flow' / '000009.flo')
    assert '000010.png' in dataset.skipped[0][1]


def test_nothing_usable_raises(tmp_path):
    FolderWriter(tmp_path).write(0, image=np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match='images'):
        LaneFolderDataset(tmp_path)
    with pytest.raises(DatasetError):
        FlowFolderDataset(tmp_path)


def test_corrupt_files_raise_naming_the_file(folder):
    root, frames = folder
    bad_image = root / 'images' / '000001.png'
    bad_image.write_bytes(np.random.default_rng(5).bytes(300))
    dataset = LaneFolderDataset(root)
    with pytest.raises(DatasetError) as info:
        dataset[1]
    assert str(bad_image) in str(info.value) and info.value.path == str(bad_image)
    np.testing.assert_array_equal(dataset[0]['image'], frames[0]['image'])
    np.testing.assert_array_equal(dataset[2]['mask'], frames[2]['mask'])
    bad_flow = root / 'flow' / '000002.flo'
    bad_flow.write_bytes(bad_flow.read_bytes()[:100])
    flows = FlowFolderDataset(root)
    with pytest.raises(DatasetError, match='truncated') as info:
        flows[2]
    assert str(bad_flow) in str(info.value)
    with pytest.raises(DatasetError, match='000001.png'):
        flows[0]  # its second image is the corrupt one


def test_writer_checks_arrays_and_leaves_no_temporaries(tmp_path):
    writer = FolderWriter(tmp_path)
    with pytest.raises(DatasetError, match='000003.png'):
        writer.write(3, mask=np.zeros((H, W), np.float32))
    with pytest.raises(DatasetError, match='000003.flo'):
        writer.write(3, flow=np.zeros((H, W, 3), np.float32))
    with pytest.raises(DatasetError, match='camera.yaml'):
        writer.write_camera({'width': W})
    writer.write(3, image=np.zeros((H, W, 3), np.uint8))
    assert [p.name for p in tmp_path.rglob('.*')] == []


def polyline_distance(points, xy):
    """Distance from each (x, y) in ``xy`` to the polyline through ``points``."""
    best = np.full(len(xy), np.inf)
    for a, b in zip(points[:-1], points[1:]):
        ab = b - a
        t = np.clip(((xy - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
        best = np.minimum(best, np.linalg.norm(xy - (a + t[:, None] * ab), axis=1))
    return best


def make_culane(root):
    """Two CULane frames: one annotated by .lines.txt only, one by a label PNG."""
    rng = np.random.default_rng(7)
    frame_dir = root / 'driver_1' / 'clip.MP4'
    frame_dir.mkdir(parents=True)
    for name in ('00000', '00030', '00060'):
        cv2.imwrite(str(frame_dir / f'{name}.jpg'), rng.integers(0, 256, (60, 80, 3), np.uint8))
    lanes = [np.array([[10.0, 59.0], [20.5, 30.0], [30.0, 5.0]]),
             np.array([[70.0, 59.0], [55.0, 10.0]])]
    (frame_dir / '00000.lines.txt').write_text(
        ''.join(' '.join(f'{v:g}' for v in lane.ravel()) + ' \n' for lane in lanes))
    label = np.zeros((60, 80), np.uint8)
    label[40:, 5:10], label[40:, 60:65] = 1, 3
    label_path = root / 'laneseg_label_w16' / 'driver_1' / 'clip.MP4' / '00030.png'
    label_path.parent.mkdir(parents=True)
    cv2.imwrite(str(label_path), label)
    (root / 'list').mkdir()
    (root / 'list' / 'train_gt.txt').write_text(
        '/driver_1/clip.MP4/00000.jpg /laneseg_label_w16/driver_1/clip.MP4/00000.png 1 1 0 0\n'
        '/driver_1/clip.MP4/00030.jpg /laneseg_label_w16/driver_1/clip.MP4/00030.png 1 0 1 0\n'
        '/driver_1/clip.MP4/00060.jpg\n'
        '/driver_1/clip.MP4/00030.jpg /x.png 1 nope\n'
        '/driver_1/clip.MP4/00090.jpg\n')
    return lanes, label


def test_culane_from_lines_txt_and_label_png(tmp_path):
    lanes, label = make_culane(tmp_path)
    dataset = CULaneDataset(tmp_path, line_width=5)
    assert len(dataset) == 2
    frame_dir = tmp_path / 'driver_1' / 'clip.MP4'
    assert [path for path, _ in dataset.skipped] == [
        str(frame_dir / '00060.jpg'), f'{tmp_path}/list/train_gt.txt:4',
        str(frame_dir / '00090.jpg')]
    reasons = [reason for _, reason in dataset.skipped]
    assert reasons[0].startswith('no label PNG') and reasons[2].startswith('image not found')
    drawn = dataset[0]
    assert drawn['name'] == 'driver_1/clip.MP4/00000.jpg'
    assert drawn['image'].shape == (60, 80, 3)
    assert drawn['exist'].tolist() == [1, 1, 0, 0]
    mask = drawn['mask']
    assert set(np.unique(mask).tolist()) == {0, 1, 2}
    for lane_id, points in enumerate(lanes, 1):
        ys, xs = np.nonzero(mask == lane_id)
        # Half the line width, plus slack for rounded vertices and raster caps.
        assert polyline_distance(points, np.stack([xs, ys], 1)).max() <= 5 / 2 + 2
        for a, b in zip(points[:-1], points[1:]):
            for x, y in np.linspace(a, b, 20):
                assert mask[int(round(y)), int(round(x))] == lane_id
    from_png = dataset[1]
    np.testing.assert_array_equal(from_png['mask'], label)
    assert from_png['exist'].tolist() == [1, 0, 1, 0]


def test_culane_list_file_forms(tmp_path):
    make_culane(tmp_path)
    (tmp_path / 'list' / 'test.txt').write_text('/driver_1/clip.MP4/00000.jpg\n')
    relative = CULaneDataset(tmp_path, list_file='list/test.txt')
    absolute = CULaneDataset(tmp_path, list_file=tmp_path / 'list' / 'test.txt')
    assert len(relative) == len(absolute) == 1
    assert 'exist' not in relative[0]
    assert relative[0]['mask'].max() == 2
    with pytest.raises(DatasetError, match='missing.txt'):
        CULaneDataset(tmp_path, list_file='list/missing.txt')
    (tmp_path / 'driver_1' / 'clip.MP4' / '00000.lines.txt').write_text('1 2 3\n')
    with pytest.raises(DatasetError, match='00000.lines.txt'):
        relative[0]


def test_tusimple_with_a_corrupt_line(tmp_path):
    rows = [10, 20, 30, 40]
    records = [
        {'lanes': [[5, 8, 11, 14], [-2, -2, -2, -2], [50, 45, -2, 35]], 'h_samples': rows,
         'raw_file': 'clips/0313-1/6040/20.jpg'},
        {'lanes': [[1, 2, 3, 4]], 'h_samples': rows, 'raw_file': 'clips/0313-1/6060/20.jpg'},
    ]
    for record in records:
        path = tmp_path / record['raw_file']
        path.parent.mkdir(parents=True)
        cv2.imwrite(str(path), np.full((48, 64, 3), 128, np.uint8))
    label = tmp_path / 'label_data_0313.json'
    label.write_text(json.dumps(records[0]) + '\n{"lanes": [[1, 2\n' + json.dumps(records[1]))
    dataset = TuSimpleDataset(tmp_path, line_width=3)
    assert len(dataset) == 2
    assert len(dataset.skipped) == 1 and dataset.skipped[0][0] == f'{label}:2'
    item = dataset[0]
    assert item['name'] == 'clips/0313-1/6040/20.jpg'
    assert item['image'].shape == (48, 64, 3)
    mask = item['mask']
    assert set(np.unique(mask).tolist()) == {0, 1, 2}  # the all -2 lane gets no id
    for x, y in zip([5, 8, 11, 14], rows):
        assert mask[y, x] == 1
    for x, y in zip([50, 45, 35], [10, 20, 40]):
        assert mask[y, x] == 2
    assert mask[:5].max() == 0 and mask[45:].max() == 0
    explicit = TuSimpleDataset(tmp_path, label_files=['label_data_0313.json'])
    assert len(explicit) == 2


def test_kitti_layout(tmp_path):
    rng = np.random.default_rng(11)
    base = tmp_path / 'training'
    for folder in ('image_2', 'flow_occ'):
        (base / folder).mkdir(parents=True)
    images = [rng.integers(0, 256, (H, W, 3), np.uint8) for _ in range(2)]
    cv2.imwrite(str(base / 'image_2' / '000000_10.png'), images[0])
    cv2.imwrite(str(base / 'image_2' / '000000_11.png'), images[1])
    cv2.imwrite(str(base / 'image_2' / '000001_10.png'), images[0])
    flow = (rng.standard_normal((H, W, 2)) * 20).astype(np.float32)
    valid = rng.random((H, W)) > 0.5
    write_kitti_flow(base / 'flow_occ' / '000000_10.png', flow, valid)
    for root in (tmp_path, base):
        dataset = KittiFlowDataset(root)
        assert len(dataset) == 1
        assert dataset.skipped[0][0] == str(base / 'image_2' / '000001_10.png')
        item = dataset[0]
        assert item['name'] == '000000_10'
        np.testing.assert_array_equal(item['image1'], images[0])
        np.testing.assert_array_equal(item['image2'], images[1])
        np.testing.assert_array_equal(item['valid'], valid)
        assert np.abs(item['flow'] - flow)[valid].max() <= 1 / 64
        np.testing.assert_array_equal(
            item['flow'], read_kitti_flow(base / 'flow_occ' / '000000_10.png')[0])


def test_factories_pick_the_class(folder, tmp_path):
    root, _ = folder
    assert isinstance(open_lane_dataset(root), LaneFolderDataset)
    assert isinstance(open_flow_dataset(root), FlowFolderDataset)
    culane = tmp_path / 'culane'
    make_culane(culane)
    assert isinstance(open_lane_dataset(culane, 'culane', line_width=4), CULaneDataset)
    clip = tmp_path / 'tusimple' / 'clips' / 'a' / '20.jpg'
    clip.parent.mkdir(parents=True)
    cv2.imwrite(str(clip), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / 'tusimple' / 'test_label.json').write_text(json.dumps(
        {'lanes': [[1, 2]], 'h_samples': [2, 6], 'raw_file': 'clips/a/20.jpg'}))
    assert isinstance(open_lane_dataset(tmp_path / 'tusimple', fmt='tusimple'), TuSimpleDataset)
    kitti = tmp_path / 'kitti' / 'training'
    for folder_name in ('image_2', 'flow_noc'):
        (kitti / folder_name).mkdir(parents=True)
    for name in ('000000_10', '000000_11'):
        cv2.imwrite(str(kitti / 'image_2' / f'{name}.png'), np.zeros((4, 4, 3), np.uint8))
    write_kitti_flow(kitti / 'flow_noc' / '000000_10.png', np.zeros((4, 4, 2)))
    assert isinstance(open_flow_dataset(tmp_path / 'kitti', 'kitti'), KittiFlowDataset)
    with pytest.raises(ValueError, match='culane'):
        open_lane_dataset(root, 'cityscapes')
    with pytest.raises(ValueError, match='kitti'):
        open_flow_dataset(root, 'sintel')
