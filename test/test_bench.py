"""``lane-seg bench`` on tiny models: JSON, Markdown and plots written, numbers sane."""

import json

from engine_models import session_models, UNET_ARCH
from lane_seg.bench import cpu_peak, onnx_conv_stats, plan, run_bench
from lane_seg.cli import main
from lane_seg.engines.int8_kernels import int8_kernels
import pytest


@pytest.fixture(scope='session')
def models(tmp_path_factory):
    return session_models(tmp_path_factory)


def test_bench_writes_json_markdown_and_plots(models, tmp_path):
    out = tmp_path / 'bench'
    report = run_bench(models=[str(models['lane_int8_ort']), str(models['flow_int8_ort'])],
                       backends=['onnxruntime'], frames=3, out=out, size=(96, 128),
                       progress=False, warmup=1)
    for name in ('bench.json', 'bench.md', 'latency_hist.png', 'accuracy_vs_latency.png'):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / 'bench.json').read_text())
    assert data['machine']['cpu'] and data['machine']['versions']['onnxruntime']
    names = [r['name'] for r in data['results']]
    form = 'ort' if int8_kernels()[0] == 'u8s8' else 'u8u8'   # the twin this CPU runs
    assert names[:2] == [f'flow_int8 / onnxruntime / int8 ({form})',
                         f'lane_int8 / onnxruntime / int8 ({form})']
    assert len(names) == 6 and all('error' not in r for r in data['results']), data['results']
    lanes = data['results'][1]
    assert lanes['frames_timed'] == 3 and lanes['latency']['median_ms'] > 0
    assert set(lanes['stages_median_ms']) == {'preprocess', 'inference', 'postprocess'}
    assert 0.0 <= lanes['accuracy']['lane_iou'] <= 1.0
    assert lanes['params'] > 0 and lanes['macs'] > 0 and 0 < lanes['peak_fraction'] < 1
    assert lanes['memory']['peak_rss_mb'] > 10 and not lanes['memory']['torch_imported']
    flow = data['results'][0]
    assert flow['accuracy']['epe_px'] >= 0 and flow['frames_timed'] == 3
    dis = [r for r in data['results'] if r['backend'] == 'opencv']
    assert len(dis) == 4 and all(r['accuracy']['epe_px'] is not None for r in dis)
    both = data['memory_both_int8']
    assert both['peak_rss_mb'] > 10 and both['torch_imported'] is False
    assert [t['ok'] for t in data['targets']].count(None) == 0
    md = (out / 'bench.md').read_text()
    assert f'| lane_int8 / onnxruntime / int8 ({form}) |' in md and 'OpenCV dis ultrafast' in md
    assert 'ONNX Runtime int8 kernels u8' in md
    assert 'cores x' in md and report['written'][0].endswith('bench.json')


def test_plan_skips_what_cannot_run_with_reasons(models):
    configs, skipped = plan([str(models['lane_int8_ort']), str(models['const_flow'])],
                            ['onnxruntime', 'torch', 'tensorrt'])
    names = [c.name for c in configs]
    form = 'ort' if int8_kernels()[0] == 'u8s8' else 'u8u8'
    assert f'lane_int8 / onnxruntime / int8 ({form})' in names
    assert 'lane_int8 / torch / int8' in names
    assert 'lane_int8 / tensorrt / int8' in names           # its QDQ sibling is there
    trt = next(c for c in configs if c.backend == 'tensorrt' and c.task == 'lanes')
    assert trt.model.endswith('lane_int8_qdq.onnx')
    assert 'const_flow / tensorrt / fp16' in names          # float models build as fp16
    assert any('no checkpoint' in s for s in skipped)       # const_flow x torch
    assert configs[-1].backend == 'torch'


def test_macs_counted_from_the_graph_match_torch(models):
    from lane_seg.models.layers import count_macs, count_parameters
    from lane_seg.models.unet import UNet, UNetConfig
    model = UNet(UNetConfig(**UNET_ARCH))
    stats = onnx_conv_stats(models['lane_fp32'])
    assert stats['macs'] == count_macs(model, (1, 3, 64, 128))
    # BatchNorm is folded into the convolutions in the ONNX graph (biases added, BN removed).
    assert 0.9 * count_parameters(model) < stats['params'] <= count_parameters(model)
    assert onnx_conv_stats(models['lane_int8_qdq'])['macs'] == stats['macs']


def test_cpu_peak_says_how_it_is_computed():
    peak = cpu_peak(2)
    assert peak['cores'] >= 1 and peak['int8_macs_per_cycle'] in (32, 64)
    assert 'MACs/cycle' in peak['how']


def test_bench_verb(models, tmp_path, capsys):
    rc = main(['bench', '--models', str(models['lane_fp32']), '--backends', 'onnxruntime',
               '--frames', '2', '--size', '64x96', '--out', str(tmp_path), '--no-opencv',
               '--no-memory', '--quiet'])
    assert rc == 0
    assert '| lane_fp32 / onnxruntime / fp32 |' in capsys.readouterr().out
    assert (tmp_path / 'bench.md').exists()


def test_plan_runs_each_int8_file_once_and_names_its_kernels(models, monkeypatch):
    """Both ORT forms given: one run, of the twin the engine would pick, named as such."""
    for kernels, form in (('u8s8', 'ort'), ('u8u8', 'u8u8')):
        monkeypatch.setenv('LANE_SEG_INT8_KERNELS', kernels)
        configs, skipped = plan([str(models['lane_int8_ort']), str(models['lane_int8_u8u8'])],
                                backends=['onnxruntime'])
        assert [c.name for c in configs] == [f'lane_int8 / onnxruntime / int8 ({form})']
        assert configs[0].model.endswith(f'lane_int8_{form}.onnx')
        assert configs[0].notes == [f'int8 kernels {kernels} (LANE_SEG_INT8_KERNELS={kernels})']
        assert len(skipped) == 1 and 'already in the grid' in skipped[0]
