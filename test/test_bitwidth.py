"""
Learned bit widths: the study's finite-difference gradient, hardware losses, export, footprint.

The gradient is checked against a brute-force finite difference computed here by hand (copies
of the model with explicit widths); the hardware losses and the footprint table against a
two-layer net small enough to count on paper.
"""

import copy

from helpers import FLOW, TINY
from lane_seg.models import checkpoint
from lane_seg.models.bitwidth import (apply_layer_bits, export_learned, footprint_table,
                                      format_footprint, hardware_cost, LearnedBits, MAX_BITS,
                                      MIN_BITS, read_layer_bits, restore_layer_bits,
                                      round_bits, set_bits, trace_layers)
from lane_seg.models.export import check_tensorrt_qdq
from lane_seg.models.flownet import FlowNetConfig, FlowNetS
from lane_seg.models.layers import count_macs
from lane_seg.models.metadata import read_model_metadata
from lane_seg.models.quant import (ActQuant, calibrate, link_bias_quantizers, QConv2d,
                                   qrange, quant_summary, QuantConfig, quantize_model)
from lane_seg.models.unet import UNet, UNetConfig
import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch
from torch import nn
import torch.nn.functional as F

LAM, ALPHA = 0.97, 4.0


pytestmark = pytest.mark.usefixtures('one_thread')


class TwoLayer(nn.Module):
    """q_in -> conv1 (2->3, 3x3) -> ReLU -> quantizer -> conv2 (3->1, 1x1): countable by hand."""

    def __init__(self):
        super().__init__()
        self.q_in = nn.Identity()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(self.q_in(x))))


def two_layer(seed=0):
    """Calibrated fake-quantized TwoLayer, its float twin, an input batch and a target."""
    torch.manual_seed(seed)
    net = TwoLayer().eval()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(seed + 1))
    q = quantize_model(net, QuantConfig())
    calibrate(q, [x])
    with torch.no_grad():
        target = ref(x) + 0.05
    return q, ref, x, target


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    q = quantize_model(UNet(UNetConfig(**TINY)).eval(), QuantConfig())
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(q, [x])
    return q, x


def mse_fn(model, x, target):
    return lambda: F.mse_loss(model(x), target)


def loss_at(model, x, target, widths):
    """
    Brute force: the loss of a copy of ``model`` whose quantizers get ``widths`` by hand.

    ``widths`` maps layer names to lists of widths applied in turn; each activation change
    rescales the step by qmax(old) / qmax(new), i.e. keeps the clipping range (the rule the
    learned widths follow).
    """
    m = copy.deepcopy(model)
    link_bias_quantizers(m, x[:1])   # the copy's convs must read the copy's quantizers
    modules = dict(m.named_modules())
    for name, chain in widths.items():
        module = modules[name]
        for b in chain:
            if isinstance(module, ActQuant):
                with torch.no_grad():
                    module.scale.mul_(qrange(module.bits)[1] / qrange(b)[1])
            module.bits = b
    with torch.no_grad():
        return float(F.mse_loss(m(x), target))


# ---------------------------------------------------------------- rounding and ranges


@pytest.mark.parametrize('value, bits', [
    (2.5, 3), (3.5, 4), (4.5, 5), (7.5, 8), (4.49, 4), (4.51, 5), (5.0, 5),
    (1.2, 2), (1.6, 2), (8.4, 8), (9.7, 8), (2.0, 2), (8.0, 8),
])
def test_round_bits_is_half_up_then_clamped(value, bits):
    assert round_bits(value) == bits
    assert round_bits(torch.tensor(value)) == bits


def test_rounded_and_quantizers_follow_the_learned_widths():
    q, _, x, _ = two_layer()
    lb = LearnedBits(q)
    assert lb.group_names == ['weights:conv1', 'weights:conv2', 'activations:q_in',
                              'activations:relu.1']
    assert lb.rounded() == {'weights': {'conv1': 8, 'conv2': 8},
                            'activations': {'relu.1': 8, 'q_in': 8}}
    with torch.no_grad():
        lb.n.copy_(torch.tensor([2.5, 3.49, 6.5, 7.5]))
    lb.sync()
    expected = {'weights': {'conv1': 3, 'conv2': 3}, 'activations': {'q_in': 7, 'relu.1': 8}}
    assert lb.rounded() == expected
    assert quant_summary(q) == expected   # forward passes use round(N)
    assert lb.bits()['weights']['conv1'] == pytest.approx(2.5)


def test_activation_width_change_keeps_the_clipping_range():
    q, _, _, _ = two_layer()
    act = q.relu[1]
    before = float(act.scale.detach()) * qrange(act.bits)[1]
    set_bits(act, 3)
    assert float(act.scale.detach()) * qrange(3)[1] == pytest.approx(before, rel=1e-6)
    w_range = float(q.conv1.weight_scale().max()) * qrange(q.conv1.bits)[1]
    set_bits(q.conv1, 4)
    assert float(q.conv1.weight_scale().max()) * 7 == pytest.approx(w_range, rel=1e-6)
    with pytest.raises(ValueError, match='outside 2..8'):
        set_bits(act, 1)
    # The study scheme's unsigned [0, 4 sigma] range: qmax = 2^b - 1.
    study = quantize_model(TwoLayer().eval(), QuantConfig(scheme='study'))
    calibrate(study, [torch.randn(2, 2, 4, 4)])
    sigma4 = study.relu[1]
    before = float(sigma4.scale.detach()) * 255
    set_bits(sigma4, 4)
    assert float(sigma4.scale.detach()) * 15 == pytest.approx(before, rel=1e-6)


# ---------------------------------------------------------------- gradient


def test_finite_difference_gradient_matches_brute_force_per_layer():
    q, _, x, target = two_layer()
    pristine = copy.deepcopy(q)   # 8 bits everywhere
    lb = LearnedBits(q, lam=LAM, alpha=ALPHA)
    start = {'conv1': 5, 'conv2': 6, 'q_in': 7, 'relu.1': 4}
    with torch.no_grad():
        lb.n.copy_(torch.tensor([5.2, 5.8, 6.9, 4.3]))   # rounds to ``start``
    lb.sync()
    scales = [float(m.scale.detach()) for m in q.modules() if isinstance(m, ActQuant)]
    info = lb.gradients(mse_fn(q, x, target))
    base = loss_at(pristine, x, target, {k: [v] for k, v in start.items()})
    assert info['loss'] == pytest.approx(base, rel=1e-6)
    for g, group in enumerate(lb.group_names):
        name = group.split(':')[1]
        lower = loss_at(pristine, x, target, {**{k: [v] for k, v in start.items()},
                                              name: [start[name], start[name] - 1]})
        expected = LAM * (base - lower) + (1 - LAM) * ALPHA   # dL_hard/dN = alpha
        assert float(info['grad'][g]) == pytest.approx(expected, rel=1e-5, abs=1e-7), group
        assert float(info['task_diff'][g]) == pytest.approx(base - lower, rel=1e-5, abs=1e-7)
    assert any(abs(float(d)) > 1e-6 for d in info['task_diff'])   # a real test, not 0 == 0
    # The probes leave widths and steps exactly as they were.
    assert quant_summary(q) == {'weights': {'conv1': 5, 'conv2': 6},
                                'activations': {'q_in': 7, 'relu.1': 4}}
    assert [float(m.scale.detach()) for m in q.modules()
            if isinstance(m, ActQuant)] == scales


def test_finite_difference_gradient_matches_brute_force_uniform_unet():
    q, x = tiny_unet()
    target = torch.zeros(2, 1, 16, 32)
    lb = LearnedBits(q, mode='uniform', hardware='size', lam=0.5, alpha=2.0)
    assert lb.group_names == ['weights', 'activations']
    calls = []
    fn = mse_fn(q, x, target)
    info = lb.gradients(lambda: calls.append(1) or fn())
    assert len(calls) == 3   # L(N), then one forward per group
    convs = [n for n, m in q.named_modules() if isinstance(m, QConv2d)]
    acts = [n for n, m in q.named_modules() if isinstance(m, ActQuant)]
    base = loss_at(q, x, target, {})
    for g, names in enumerate((convs, acts)):
        lower = loss_at(q, x, target, {n: [7] for n in names})
        # Normalised size: d/dN_w of alpha * sum(p_l N_w) / (8 sum p_l) = alpha / 8; the
        # activations do not enter the model size.
        hard = 2.0 / 8 if g == 0 else 0.0
        expected = 0.5 * (base - lower) + 0.5 * hard
        assert float(info['grad'][g]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # One loss value passed in saves the first forward.
    calls.clear()
    lb.gradients(lambda: calls.append(1) or fn(), loss=info['loss'])
    assert len(calls) == 2


def test_lower_bound_uses_the_forward_difference():
    q, _, x, target = two_layer()
    lb = LearnedBits(q, init_bits=2, lam=1.0)
    info = lb.gradients(mse_fn(q, x, target))
    base = info['loss']
    up = loss_at(q, x, target, {'conv1': [3]})   # 1 bit has no symmetric grid
    assert float(info['task_diff'][0]) == pytest.approx(up - base, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- hardware losses


def set_widths(lb, values):
    with torch.no_grad():
        lb.n.copy_(torch.tensor(values, dtype=torch.float32))
    lb.sync()


def test_hardware_losses_on_a_hand_counted_net():
    q, _, _, _ = two_layer()
    shape = (1, 2, 4, 4)
    # conv1: 2x3x3x3 = 54 weights, 3 x 16 outputs x 18 = 864 MACs, input from q_in.
    # conv2: 3 weights, 16 outputs x 3 = 48 MACs, input from relu.1.
    widths = [4, 6, 5, 3]   # conv1, conv2, q_in, relu.1
    raw = LearnedBits(q, hardware='sum_bits', alpha=ALPHA)
    set_widths(raw, widths)
    assert float(raw.hardware_loss().detach()) == pytest.approx(ALPHA * 18)   # the study: no /8
    assert raw.hardware_grad().tolist() == pytest.approx([ALPHA] * 4)
    norm = LearnedBits(q, hardware='sum_bits', alpha=ALPHA, normalize=True)
    set_widths(norm, widths)
    assert float(norm.hardware_loss().detach()) == pytest.approx(ALPHA * 18 / 32)
    size = LearnedBits(q, hardware='size', alpha=ALPHA)
    set_widths(size, widths)
    assert float(size.hardware_loss().detach()) == pytest.approx(
        ALPHA * (54 * 4 + 3 * 6) / (8 * 57))
    assert size.hardware_grad().tolist() == pytest.approx(
        [ALPHA * 54 / 456, ALPHA * 3 / 456, 0.0, 0.0])
    ops = LearnedBits(q, hardware='bitops', alpha=ALPHA, input_shape=shape)
    set_widths(ops, widths)
    ref = 64 * (864 + 48)
    assert float(ops.hardware_loss().detach()) == pytest.approx(
        ALPHA * (864 * 4 * 5 + 48 * 6 * 3) / ref)
    assert ops.hardware_grad().tolist() == pytest.approx(
        [ALPHA * 864 * 5 / ref, ALPHA * 48 * 3 / ref, ALPHA * 864 * 4 / ref,
         ALPHA * 48 * 6 / ref])
    # At 8 bits everywhere a normalised loss is alpha.
    set_widths(ops, [8, 8, 8, 8])
    assert float(ops.hardware_loss().detach()) == pytest.approx(ALPHA)
    # The loss sees the rounded widths; the gradient goes straight through the rounding.
    set_widths(size, [4.4, 6.4, 5, 3])
    assert float(size.hardware_loss().detach()) == pytest.approx(
        ALPHA * (54 * 4 + 3 * 6) / (8 * 57))
    set_widths(size, widths)
    assert hardware_cost(q, shape) == {'sum_bits': 18, 'model_size_bits': 54 * 4 + 3 * 6,
                                       'bias_bits': 4 * 32, 'macs': 912,
                                       'bitops': 864 * 4 * 5 + 48 * 6 * 3}
    with pytest.raises(ValueError, match='input_shape'):
        LearnedBits(q, hardware='bitops')


def test_trace_macs_match_count_macs():
    q, _ = tiny_unet()
    flow = quantize_model(FlowNetS(FlowNetConfig(**FLOW)).eval(), QuantConfig())
    for model, shape in ((q, (1, 3, 32, 64)), (flow, (1, 6, 32, 64))):
        convs = [ev for ev in trace_layers(model, shape)['events'] if ev['kind'] == 'conv']
        assert sum(ev['macs'] for ev in convs) == count_macs(model, shape)
        assert len(convs) == sum(isinstance(m, QConv2d) for m in model.modules())


# ---------------------------------------------------------------- training behaviour


def test_small_lambda_bits_fall_to_the_floor():
    q, _, x, target = two_layer()
    lb = LearnedBits(q, lam=0.1, lr=0.5)
    for _ in range(6):
        info = lb.step(mse_fn(q, x, target))
    assert all(v == MIN_BITS for kind in info['bits'].values() for v in kind.values())
    assert quant_summary(q) == lb.rounded()


def test_lambda_one_bits_do_not_fall_when_it_hurts():
    q, ref, x, _ = two_layer()
    with torch.no_grad():
        target = ref(x)   # the float net: fewer bits, larger error
    lb = LearnedBits(q, mode='uniform', lam=1.0, init_bits=4, lr=0.5)
    fn = mse_fn(q, x, target)
    first = lb.gradients(fn)
    assert (first['task_diff'] < 0).all()   # one bit fewer hurts in both groups
    for _ in range(5):
        lb.step(fn)
        assert (lb.n.detach() >= 4.0).all()
    lb.optimizer.param_groups[0]['lr'] = 1e4
    lb.step(fn)
    assert lb.n.detach().tolist() == [MAX_BITS, MAX_BITS]   # clamped, never above 8


def test_bit_update_every_and_apply_rounded():
    q, _, x, target = two_layer()
    lb = LearnedBits(q, lam=0.0, lr=0.3, bit_update_every=3)
    calls = []
    fn = mse_fn(q, x, target)
    results = [lb.step(lambda: calls.append(1) or fn()) for _ in range(6)]
    assert [r is None for r in results] == [True, True, False, True, True, False]
    assert len(calls) == 2 * 5   # L(N) + 4 groups, twice
    assert lb.n.detach().tolist() == pytest.approx([8 - 2 * 0.3 * ALPHA] * 4)
    widths = lb.apply_rounded()
    assert widths == quant_summary(q) == q.layer_bits
    assert lb.n.detach().tolist() == [6.0] * 4
    with pytest.raises(RuntimeError, match='frozen'):
        lb.step(fn)


def test_learned_widths_are_not_model_parameters():
    q, _, _, _ = two_layer()
    lb = LearnedBits(q)
    assert list(lb.state_dict()) == ['n']
    assert all(p is not lb.n for p in q.parameters())
    lb.load_state_dict({'n': torch.tensor([3.0, 4.0, 5.0, 6.0])})   # resume: quantizers follow
    assert quant_summary(q) == {'weights': {'conv1': 3, 'conv2': 4},
                                'activations': {'q_in': 5, 'relu.1': 6}}


def test_restore_layer_bits_round_trip():
    q, _, x, _ = two_layer()
    lb = LearnedBits(q)
    set_widths(lb, [3, 5, 4, 6])
    saved = copy.deepcopy(q.state_dict())
    widths = lb.apply_rounded()
    rebuilt, _, _, _ = two_layer()
    rebuilt.load_state_dict(saved)
    restore_layer_bits(rebuilt, widths)
    link_bias_quantizers(rebuilt, x[:1])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), q(x))
    with pytest.raises(ValueError, match='not a QConv2d'):
        restore_layer_bits(rebuilt, {'weights': {'relu.1': 4}})


def test_apply_layer_bits_sets_named_layers_and_keeps_ranges():
    q, _, x, _ = two_layer()
    before = q.relu[1].scale.item() * qrange(8)[1]
    widths = apply_layer_bits(q, {'weights': {'conv2': 3}, 'activations': {'relu.1': 4}})
    assert widths == {'weights': {'conv1': 8, 'conv2': 3},
                      'activations': {'q_in': 8, 'relu.1': 4}}
    assert widths == quant_summary(q)
    # a calibrated activation keeps its clipping range: the step grows by qmax(8) / qmax(4)
    assert q.relu[1].scale.item() * qrange(4)[1] == pytest.approx(before)
    with pytest.raises(ValueError, match=r"weights layers \['relu.1'\] are not QConv2ds"):
        apply_layer_bits(q, {'weights': {'relu.1': 4}})
    with pytest.raises(ValueError, match=r"activations layers \['nope'\]"):
        apply_layer_bits(q, {'activations': {'nope': 4}})
    assert quant_summary(q) == widths   # a refused file changes nothing


def test_read_layer_bits_from_json_and_checkpoint_metadata(tmp_path):
    plain = tmp_path / 'w.json'
    plain.write_text('{"weights": {"conv1": 4}}')
    assert read_layer_bits(plain) == {'weights': {'conv1': 4}, 'activations': {}}
    widths = {'weights': {'conv1': 3}, 'activations': {'q_in': 6}}
    (tmp_path / 'run.json').write_text(
        '{"format": "lane_seg.model/1", "quantization": {"layer_bits": %s}}'
        % str(widths).replace("'", '"'))
    assert read_layer_bits(tmp_path / 'run.safetensors') == widths   # its sidecar metadata
    assert read_layer_bits(tmp_path / 'run.json') == widths
    (tmp_path / 'float.json').write_text('{"format": "lane_seg.model/1", '
                                         '"quantization": {"scheme": "float32"}}')
    bad = {'float.safetensors': 'has no quantization.layer_bits',
           'missing.json': 'no file',
           'w9.json': r"weights 'conv1' = 9, not an integer in 2..8",
           'wf.json': r"weights 'conv1' = 4.5",
           'list.json': 'must hold',
           'junk.json': 'not readable JSON'}
    (tmp_path / 'w9.json').write_text('{"weights": {"conv1": 9}}')
    (tmp_path / 'wf.json').write_text('{"weights": {"conv1": 4.5}}')
    (tmp_path / 'list.json').write_text('[4, 4]')
    (tmp_path / 'junk.json').write_text('{"weights": ')
    for name, message in bad.items():
        with pytest.raises(ValueError, match=message):
            read_layer_bits(tmp_path / name)


def test_checkpoint_round_trip_with_layer_bits(tmp_path):
    arch = {'type': 'unet', 'config': dict(TINY),
            'quant': {'weight_bits': 8, 'act_bits': 8, 'per_channel': True,
                      'learn_scales': True, 'scheme': 'ours'}}
    torch.manual_seed(0)
    q = checkpoint.build_model(arch).eval()
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    calibrate(q, [x])
    lb = LearnedBits(q)
    set_widths(lb, np.linspace(2, 8, len(lb.group_names)).tolist())
    meta = dict(lane_meta(), architecture=arch)
    meta['quantization'] = {'scheme': 'fake-quant-learned', 'layer_bits': lb.apply_rounded()}
    path = checkpoint.save(tmp_path / 'learned.safetensors', q, meta)
    loaded, info = checkpoint.load_model(path)
    restore_layer_bits(loaded, info['quantization']['layer_bits'])
    assert quant_summary(loaded) == quant_summary(q)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


# ---------------------------------------------------------------- export


def lane_meta(h=32, w=64):
    return {'format': 'lane_seg.model/1', 'task': 'lane_segmentation', 'name': 'lane_learned',
            'inputs': [{'name': 'image', 'shape': [1, 3, h, w], 'layout': 'NCHW',
                        'dtype': 'float32'}],
            'outputs': [{'name': 'logits', 'shape': [1, 1, h // 2, w // 2], 'kind': 'logits'}],
            'color_order': 'RGB',
            'normalization': {'scale': 1 / 255, 'mean': [0.485, 0.456, 0.406],
                              'std': [0.229, 0.224, 0.225]},
            'quantization': {'scheme': 'fake-quant-learned'}, 'training': {},
            'metrics': {}, 'weights_sha256': ''}


def run_reference(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1].numpy()})[0]
                           for i in range(x.shape[0])])


def weight_codes(path):
    """Integer codes of every exported weight: round(w / scale) per output channel."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in graph.node if n.op_type == 'Constant'}
    codes = {}
    for node in graph.node:
        if node.op_type == 'QuantizeLinear' and node.input[0] in inits:
            w = inits[node.input[0]]
            scale = consts[node.input[1]].reshape(-1, 1, 1, 1)
            codes[node.input[0][:-len('.weight')]] = np.round(w / scale)
    return codes


def test_export_learned_widths_passes_tensorrt_rules_and_keeps_true_widths(tmp_path):
    q, x = tiny_unet()
    lb = LearnedBits(q)
    set_widths(lb, np.linspace(2, 8, len(lb.group_names)).tolist())
    widths = lb.apply_rounded()
    assert {v for kind in widths.values() for v in kind.values()} >= {2, 4, 8}
    path = tmp_path / 'lane_learned_qdq.onnx'
    meta = export_learned(q, lane_meta(), path)
    assert check_tensorrt_qdq(path) == []
    stored = read_model_metadata(path)['quantization']
    assert stored == meta['quantization']
    assert stored['layer_bits'] == widths          # the true widths, not the int8 containers
    assert stored['scheme'] == 'qdq-int8-symmetric'
    convs = {n: m for n, m in q.named_modules() if isinstance(m, QConv2d)}
    assert stored['model_size_bits'] == sum(m.weight.numel() * widths['weights'][n]
                                            for n, m in convs.items())
    assert stored['bitops'] == hardware_cost(q, (1, 3, 32, 64))['bitops']
    sub8 = sum(b < 8 for b in widths['activations'].values())
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count('Clip') == stored['clipped_activations'] == sub8
    # Weights: int8 codes on the b-bit grid, i.e. within +-(2^(b-1) - 1).
    for name, codes in weight_codes(path).items():
        assert np.abs(codes).max() <= qrange(widths['weights'][name])[1], name
    # The ONNX model computes what the trained fake-quantized model computes.
    with torch.no_grad():
        ref = q(x).numpy()
    out = run_reference(path, x)
    head = q.head
    step = float(head.input_quant().scale.detach().abs()) * float(
        head.quantized_weight().detach().abs().max())
    assert np.abs(out - ref).max() <= step
    assert quant_summary(q) == widths   # the export worked on a copy


def test_export_clip_keeps_the_learned_range_outside_calibration(tmp_path):
    q, x = tiny_unet()
    lb = LearnedBits(q)
    set_widths(lb, np.linspace(3, 7, len(lb.group_names)).tolist())   # no 8-bit activation
    lb.apply_rounded()
    x = 3 * x   # well outside the calibrated ranges
    with torch.no_grad():
        ref = q(x).numpy()
    head = q.head
    step = float(head.input_quant().scale.detach().abs()) * float(
        head.quantized_weight().detach().abs().max())
    errors = {}
    for clip in (True, False):
        path = tmp_path / f'clip_{clip}.onnx'
        export_learned(q, lane_meta(), path, clip=clip)
        errors[clip] = np.abs(run_reference(path, x) - ref).max() / step
    assert errors[True] <= 1.0
    assert errors[False] > 1.0   # int8 alone would only saturate at 127 steps


def test_flow_learned_bits_step_and_export(tmp_path):
    torch.manual_seed(0)
    flow = quantize_model(FlowNetS(FlowNetConfig(**FLOW)).eval(), QuantConfig())
    x = torch.randn(2, 6, 32, 64, generator=torch.Generator().manual_seed(3))
    calibrate(flow, [x])
    target = torch.zeros(2, 2, 8, 16)
    lb = LearnedBits(flow, mode='uniform', hardware='bitops', input_shape=(1, 6, 32, 64),
                     lam=0.0, lr=2.0)
    info = lb.step(mse_fn(flow, x, target))
    assert all(v < MAX_BITS for kind in info['bits'].values() for v in kind.values())
    lb.apply_rounded()
    meta = lane_meta()
    meta.update(task='optical_flow', name='flow_learned',
                inputs=[{'name': 'frames', 'shape': [1, 6, 32, 64], 'layout': 'NCHW',
                         'dtype': 'float32'}],
                outputs=[{'name': 'flow', 'shape': [1, 2, 8, 16], 'kind': 'flow',
                          'flow_scale': 20.0}])
    path = tmp_path / 'flow_learned_qdq.onnx'
    meta = export_learned(flow, meta, path)
    assert check_tensorrt_qdq(path) == []
    assert meta['quantization']['layer_bits'] == quant_summary(flow)


def test_export_refuses_the_study_scheme(tmp_path):
    torch.manual_seed(0)
    study = quantize_model(UNet(UNetConfig(**TINY)).eval(), QuantConfig(scheme='study'))
    with pytest.raises(ValueError, match='signed symmetric'):
        export_learned(study, lane_meta(), tmp_path / 'x.onnx')


# ---------------------------------------------------------------- footprint


def test_footprint_table_on_a_hand_counted_net():
    q, _, _, _ = two_layer()
    lb = LearnedBits(q)
    set_widths(lb, [4, 6, 5, 3])   # conv1, conv2, q_in, relu.1
    rows = footprint_table(q, (1, 2, 4, 4))
    assert [(r['layer'], r['kind']) for r in rows] == [
        ('q_in', 'quant'), ('conv1', 'conv'), ('conv2', 'conv')]
    # q_in reads the float input (32 values x 4 B) and writes 32 values x 5 bits = 20 B.
    assert (rows[0]['in_bytes'], rows[0]['out_bytes'], rows[0]['peak_act_bytes']) == \
        (128, 20, 148)
    # conv1: 54 weights x 4 bits = 27 B + 3 int32 biases; writes 48 values x 3 bits = 18 B.
    assert (rows[1]['weight_bytes'], rows[1]['macs'], rows[1]['act_bits']) == (39, 864, 5)
    assert (rows[1]['in_bytes'], rows[1]['out_bytes'], rows[1]['peak_act_bytes']) == \
        (20, 18, 38)
    # conv2: 3 weights x 6 bits -> 3 B + 1 bias; the head's output is 16 x 32-bit.
    assert (rows[2]['weight_bytes'], rows[2]['out_bytes'], rows[2]['peak_act_bytes']) == \
        (7, 64, 82)
    assert sum(r['weight_bytes'] for r in rows) == 46
    assert footprint_table(q, (1, 2, 4, 4), input_bits=8)[0]['peak_act_bytes'] == 32 + 20
    table = format_footprint(rows)
    assert '| **total** | | | | 57 | 912 | 46 | | | 148 (max) |' in table


def test_footprint_counts_skip_tensors_and_sums_to_the_model():
    q, _ = tiny_unet()
    shape = (1, 3, 32, 64)
    rows = footprint_table(q, shape, input_bits=8)
    cost = hardware_cost(q, shape)
    convs = [m for m in q.modules() if isinstance(m, QConv2d)]
    assert sum(r['weight_bytes'] for r in rows) * 8 == cost['model_size_bits'] + \
        cost['bias_bits']
    assert sum(r['macs'] for r in rows) == cost['macs'] == count_macs(q, shape)
    assert sum(r['params'] for r in rows) == sum(m.weight.numel() for m in convs)
    for r in rows:   # a step holds at least what it reads and writes
        assert r['peak_act_bytes'] >= r['in_bytes'] + r['out_bytes']
    # While the encoder runs, the stem's 1/2-resolution output waits for the last skip.
    half = 4 * 16 * 32   # base 4 channels at 16 x 32, 8 bits
    deep = next(r for r in rows if r['layer'] == 'downs.0.0.0')
    assert deep['peak_act_bytes'] == deep['in_bytes'] + deep['out_bytes'] + half
