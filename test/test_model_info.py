"""``lane-seg model info``: every artefact prints its metadata; stripped models are refused."""

import json
from pathlib import Path
import subprocess
import sys

from engine_models import session_models, strip_metadata
from lane_seg.cli import main
from lane_seg.model_info import model_info
from lane_seg.models.metadata import read_model_metadata, REQUIRED
import pytest

LANE_SEG = Path(sys.executable).parent / 'lane-seg'


@pytest.fixture(scope='session')
def models(tmp_path_factory):
    return session_models(tmp_path_factory)


def test_info_prints_what_the_model_says(models, capsys):
    assert main(['model', 'info', str(models['other_int8_ort'])]) == 0
    out = capsys.readouterr().out
    for text in ('other_int8 (lane_segmentation, int8)', 'image [1, 3, 48, 96] NCHW float32, BGR',
                 'logits [1, 1, 24, 48] logits', 'threshold', '0.3',
                 'quantization.scheme', 'qdq-int8-symmetric', 'weights_sha256',
                 'training.seed'):
        assert text in out, text
    assert main(['model', 'info', str(models['flow_fp32'])]) == 0
    assert 'flow [1, 2, 16, 32] flow, flow_scale 20.0' in capsys.readouterr().out


def test_info_json_matches_the_metadata(models, capsys):
    for name in ('lane_fp32', 'lane_int8_qdq', 'flow_int8_ort', 'lane_q'):
        path = models[name]
        assert main(['model', 'info', str(path), '--json']) == 0
        info = json.loads(capsys.readouterr().out)
        assert info['metadata'] == read_model_metadata(path)
        assert info == json.loads(json.dumps(model_info(path)))
        assert len(info['sha256']) == 64 and info['bytes'] == path.stat().st_size


def test_stripped_model_is_refused_naming_the_keys(models, tmp_path, capsys):
    stripped = strip_metadata(models['lane_int8_ort'], tmp_path / 'stripped.onnx')
    assert main(['model', 'info', str(stripped)]) == 2
    err = capsys.readouterr().err
    assert 'missing keys' in err
    for key in REQUIRED:
        assert key in err


def test_console_script(models):
    cmd = [str(LANE_SEG)] if LANE_SEG.exists() else [sys.executable, '-m', 'lane_seg.cli']
    proc = subprocess.run(cmd + ['model', 'info', str(models['lane_fp32']), '--json'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)['metadata']['name'] == 'lane_fp32'
