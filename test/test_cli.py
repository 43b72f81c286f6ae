"""The lane-seg command line, run as users run it (the installed console script)."""

import json
from pathlib import Path
import subprocess
import sys

from lane_seg.cli import main
from lane_seg.data import FlowFolderDataset, LaneFolderDataset
from lane_seg.data.folder import read_camera
import numpy as np
import pytest

LANE_SEG = Path(sys.executable).parent / 'lane-seg'


def _run(*args):
    cmd = [str(LANE_SEG)] if LANE_SEG.exists() else [sys.executable, '-m', 'lane_seg.cli']
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)


def test_sim_export_writes_the_folder_layout(tmp_path):
    out = tmp_path / 'drive'
    proc = _run('sim', 'export', '--out', str(out), '--frames', '4', '--seed', '5',
                '--size', '64x128', '--quiet')
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary['frames'] == 4 and summary['seed'] == 5
    for sub, ext, count in [('images', 'png', 4), ('masks', 'png', 4), ('markings', 'png', 4),
                            ('flow', 'flo', 3), ('flow_valid', 'png', 3)]:
        names = sorted(p.name for p in (out / sub).glob(f'*.{ext}'))
        assert len(names) == count, (sub, names)
        assert names[0] == f'000000.{ext}'
    camera = read_camera(out)
    assert camera['width'] == 128 and camera['height'] == 64
    assert camera['fx'] == pytest.approx(64.0)
    lanes = LaneFolderDataset(out)
    assert len(lanes) == 4
    item = lanes[0]
    assert item['image'].shape == (64, 128, 3) and item['mask'].max() >= 1
    flows = FlowFolderDataset(out)
    assert len(flows) == 3
    pair = flows[0]
    assert pair['flow'].shape == (64, 128, 2) and pair['valid'].any()


def test_export_matches_the_drive_exactly(tmp_path):
    from lane_seg.sim import DriveConfig, SyntheticDrive
    from lane_seg.sim.export import export_drive
    export_drive(tmp_path, frames=2, seed=3, height=48, width=96, progress=False)
    frame = SyntheticDrive(DriveConfig.sized(3, 48, 96)).frame(0)
    item = FlowFolderDataset(tmp_path)[0]
    assert np.array_equal(item['image1'], frame.image)
    assert np.array_equal(item['flow'], frame.flow)
    assert np.array_equal(item['valid'], frame.flow_valid)
    assert np.array_equal(LaneFolderDataset(tmp_path)[0]['mask'], frame.lane_mask)


def test_demo_writes_pictures_video_and_summary(tmp_path):
    proc = _run('demo', '--out', str(tmp_path), '--frames', '5', '--size', '64x128',
                '--quiet')
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary['frames'] == 5 and summary['render_fps'] > 0
    for name in ('strip.png', 'drive.mp4', 'flow_legend.png', 'summary.json'):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize('argv', [['sim', 'export', '--out', 'x', '--size', '12'],
                                  ['sim', 'export', '--out', 'x', '--size', '2x2'],
                                  ['demo', '--size', 'axb']])
def test_bad_sizes_are_refused_with_a_clear_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert 'size' in capsys.readouterr().err


def test_bad_frame_count_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(['sim', 'export', '--out', str(tmp_path), '--frames', '0', '--quiet']) == 2
    assert 'frames=0' in capsys.readouterr().err
