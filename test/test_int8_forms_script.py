"""docs/scripts/int8_forms.py: every int8 form of the shipped models, timed and checked."""

import json

from helpers import docs_script


def test_int8_forms_reports_every_form_with_speed_accuracy_and_exactness(tmp_path, monkeypatch):
    monkeypatch.delenv('LANE_SEG_INT8_KERNELS', raising=False)
    script = docs_script('int8_forms')
    script.main(['--frames', '3', '--out', str(tmp_path), '--name', 'forms'])
    report = json.loads((tmp_path / 'forms.json').read_text())
    assert report['machine']['int8_kernels_chosen'][0] in ('u8s8', 'u8u8')
    for task, accuracy in (('lanes', 'iou'), ('flow', 'epe_px')):
        rows = report['tasks'][task]
        assert list(rows) == ['qdq', 'u8s8', 'u8u8', 'fp32']
        assert rows['u8s8']['file'].endswith('_int8_ort.onnx')   # as asked, never swapped
        assert rows['u8u8']['file'].endswith('_int8_u8u8.onnx')
        for label, row in rows.items():
            assert row['inference_ms_p50'] > 0 and row[accuracy] > 0
            assert ('within_one_step' in row) == (label != 'fp32')
        assert rows['u8u8']['within_one_step'] >= 0.9             # no saturation
    assert report['tasks']['lanes']['u8u8']['iou'] > 0.5
    assert report['tasks']['flow']['u8u8']['epe_px'] < 5.0
    assert '| lanes | u8u8 | `lane_unet_int8_u8u8.onnx` |' in (tmp_path / 'forms.md').read_text()
