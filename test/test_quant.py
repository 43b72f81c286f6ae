"""Fake quantization: BatchNorm folding, weight grids, calibration, both schemes, STE."""

import copy
import math

from helpers import TINY
from lane_seg.models.flownet import FlowNetConfig, FlowNetS
from lane_seg.models.layers import ConvBNReLU
from lane_seg.models.quant import (act_quantizers, ActQuant, calibrate, fold_batchnorm,
                                   freeze_for_export, link_bias_quantizers, QConv2d, qrange,
                                   quant_summary, QuantConfig, quantize_model)
from lane_seg.models.unet import UNet, UNetConfig
import pytest
import torch
from torch import nn
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures('one_thread')


def random_bn_unet(seed=0):
    """Tiny U-Net in eval mode whose BatchNorms have non-trivial statistics and affine terms."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**TINY))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def inputs(seed=1, n=2):
    return torch.randn(n, 3, 64, 128, generator=torch.Generator().manual_seed(seed))


def rel_error(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_qrange_is_symmetric_narrow():
    assert qrange(8) == (-127, 127)
    assert qrange(4) == (-7, 7)
    assert qrange(2) == (-1, 1)


@pytest.mark.parametrize('kwargs, message', [
    ({'weight_bits': 1}, 'weight_bits=1'),
    ({'act_bits': 9}, 'act_bits=9'),
    ({'scheme': 'fpga'}, 'scheme='),
])
def test_quant_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_fold_batchnorm_preserves_outputs():
    model = random_bn_unet()
    x = inputs()
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(copy.deepcopy(model))
        out = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m[0].bias is not None for m in folded.modules() if isinstance(m, ConvBNReLU))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_keeps_a_conv_bias():
    block = ConvBNReLU(3, 4, batchnorm=True)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    block[0] = conv
    with torch.no_grad():
        block[1].running_mean.uniform_(-1, 1)
        block[1].running_var.uniform_(0.5, 2)
        conv.bias.uniform_(-1, 1)
    block.eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = block(x)
        torch.testing.assert_close(fold_batchnorm(block)(x), ref, atol=1e-5, rtol=1e-5)


def quantized(model, bits, scheme, x):
    q = quantize_model(copy.deepcopy(model), QuantConfig(weight_bits=bits, act_bits=bits,
                                                         scheme=scheme))
    calibrate(q, [x])
    return q


@pytest.mark.parametrize('scheme, tolerance', [('ours', 0.03), ('study', 0.1)])
def test_fake_quant_error_grows_as_bits_fall(scheme, tolerance):
    model = random_bn_unet()
    x = inputs()
    with torch.no_grad():
        ref = model(x)
        errors = {bits: rel_error(quantized(model, bits, scheme, x)(x), ref)
                  for bits in (8, 4, 2)}
    assert errors[8] < tolerance, errors
    assert errors[8] < errors[4] < errors[2], errors


def test_ours_scheme_structure():
    q = quantize_model(random_bn_unet(), QuantConfig())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    convs = [m for m in q.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, QConv2d) for m in convs)
    # The input and every up-sampling and concatenation point get a quantizer too.
    assert isinstance(q.q_in, ActQuant)
    assert isinstance(q.up_half.q_up, ActQuant) and isinstance(q.up_half.q_cat, ActQuant)
    relus = sum(isinstance(m, nn.ReLU) for m in q.modules())
    assert len(act_quantizers(q)) == relus + 1 + 2 * 2
    summary = quant_summary(q)
    assert set(summary['weights'].values()) == {8}
    assert len(summary['activations']) == len(act_quantizers(q))


def test_weights_lie_on_the_per_channel_grid():
    torch.manual_seed(0)
    q = quantize_model(random_bn_unet(), QuantConfig(weight_bits=8))
    for conv in (m for m in q.modules() if isinstance(m, QConv2d)):
        w = conv.weight.detach()
        scale = conv.weight_scale()
        assert scale.shape == (w.shape[0],)
        torch.testing.assert_close(scale, w.abs().flatten(1).max(dim=1).values / 127)
        levels = conv.quantized_weight().detach() / scale.view(-1, 1, 1, 1)
        torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
        assert levels.abs().max() <= 127 + 1e-3
        # Each channel's largest weight sits on the end of the grid.
        torch.testing.assert_close(levels.abs().flatten(1).max(dim=1).values.round(),
                                   torch.full((w.shape[0],), 127.0))


def test_per_tensor_weights_share_one_scale():
    conv = QConv2d.from_conv(nn.Conv2d(3, 4, 3), bits=4, per_channel=False)
    scale = conv.weight_scale()
    assert torch.all(scale == scale[0])
    torch.testing.assert_close(scale[0], conv.weight.detach().abs().max() / 7)


def test_calibrate_sets_scales_from_max_abs():
    q = quantize_model(random_bn_unet(), QuantConfig())
    batches = [inputs(seed) for seed in (1, 2, 3)]
    seen = {}

    def record(module, args):
        seen[module] = max(seen.get(module, 0.0), float(args[0].detach().abs().max()))

    hooks = [m.register_forward_pre_hook(record) for m in act_quantizers(q)]
    assert calibrate(q, batches) == 3
    for h in hooks:
        h.remove()
    largest = max(float(b.abs().max()) for b in batches)
    assert float(q.q_in.scale.detach()) == pytest.approx(largest / 127, rel=1e-6)
    for m in act_quantizers(q):
        assert bool(m.calibrated) and not m.calibrating
        assert float(m.scale.detach()) == pytest.approx(max(seen[m], 1e-4) / 127, rel=1e-6)


def test_uncalibrated_quantizer_is_identity():
    act = ActQuant(8)
    x = torch.randn(10)
    assert torch.equal(act(x), x)


def test_activation_quantizer_grid_and_saturation():
    act = ActQuant(8)
    act.calibrating = True
    act(torch.tensor([-2.0, 1.0]))
    act.finish_calibration()
    assert float(act.scale.detach()) == pytest.approx(2.0 / 127)
    x = torch.linspace(-3, 3, 101)
    with torch.no_grad():
        y = act.eval()(x)
    levels = y / (2.0 / 127)
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert float(y.max()) == pytest.approx(2.0) and float(y.min()) == pytest.approx(-2.0)
    assert float((y - x)[x.abs() <= 2].abs().max()) <= 1.0 / 127 + 1e-6   # half a step


def test_study_scheme_weights_on_the_unit_grid():
    model = random_bn_unet()
    with torch.no_grad():
        model.stem[0][0].weight.mul_(20.0)   # push some weights beyond [-1, 1]
    for bits in (8, 4):
        q = quantize_model(copy.deepcopy(model), QuantConfig(weight_bits=bits, act_bits=bits,
                                                             scheme='study'))
        qmax = qrange(bits)[1]
        assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())   # BN kept
        for conv in (m for m in q.modules() if isinstance(m, QConv2d)):
            assert conv.unit_range
            torch.testing.assert_close(conv.weight_scale(),
                                       torch.full((conv.out_channels,), 1.0 / qmax))
            w = conv.quantized_weight().detach()
            assert w.abs().max() <= 1.0 + 1e-6
            torch.testing.assert_close(w * qmax, (w * qmax).round(), atol=1e-4, rtol=0)
        assert q.stem[0][0].quantized_weight().detach().abs().max() == pytest.approx(1.0)


def test_study_scheme_activations_in_zero_to_four_sigma():
    torch.manual_seed(0)
    x = F.relu(torch.randn(4096) * 2.0 + 0.5)
    act = ActQuant(4, mode='sigma4')
    act.calibrating = True
    act(x)
    act.finish_calibration()
    sigma = float(x.double().std(unbiased=False))
    assert float(act.scale.detach()) == pytest.approx(4 * sigma / 15, rel=1e-5)
    with torch.no_grad():
        y = act.eval()(torch.cat([x, torch.tensor([-1.0, 100.0])]))
    assert float(y.min()) == 0.0                                  # unsigned
    assert float(y.max()) == pytest.approx(4 * sigma, rel=1e-5)   # clipped at 4 sigma
    levels = y / act.scale.detach()
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)


def test_study_scheme_quantizers_follow_relus_only():
    q = quantize_model(random_bn_unet(), QuantConfig(scheme='study'))
    acts = act_quantizers(q)
    assert acts and all(m.mode == 'sigma4' for m in acts)
    assert isinstance(q.q_in, nn.Identity)


def test_study_scheme_ranges_stay_fixed_during_qat():
    q = quantize_model(random_bn_unet(), QuantConfig(scheme='study', learn_scales=True))
    calibrate(q, [inputs()])
    assert not any(p.requires_grad for m in act_quantizers(q) for p in m.parameters())


@pytest.mark.parametrize('weight_bits, act_bits, what', [(4, 4, 'weights'), (8, 6, 'activ'),
                                                         (6, 8, 'weights')])
def test_freeze_for_export_refuses_non_8_bit(weight_bits, act_bits, what):
    q = quantize_model(random_bn_unet(), QuantConfig(weight_bits=weight_bits,
                                                     act_bits=act_bits))
    calibrate(q, [inputs()])
    with pytest.raises(ValueError, match=f'8-bit {what}'):
        freeze_for_export(q)


def test_freeze_for_export_makes_constants():
    q = quantize_model(random_bn_unet(), QuantConfig())
    calibrate(q, [inputs()])
    freeze_for_export(q)
    for m in act_quantizers(q):
        assert isinstance(m.frozen_scale, float)
        # The same scale the torch forward uses (|scale| + 1e-8).
        assert m.frozen_scale == pytest.approx(float(m.scale.detach().abs()) + 1e-8, rel=1e-7)
    for conv in (m for m in q.modules() if isinstance(m, QConv2d)):
        torch.testing.assert_close(conv.frozen_scale, conv.weight_scale())


def test_qconv_gradients_go_straight_through():
    torch.manual_seed(0)
    conv = QConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), bits=4, per_channel=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    # STE: the shadow weights get the gradient the conv has at the quantized weights.
    wq = conv.quantized_weight().detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    F.conv2d(x2, wq, conv.bias.detach(), padding=1).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(conv.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_act_quant_scale_gets_a_gradient_in_train_mode():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    grads = {}
    for mode in ('train', 'eval'):
        act = ActQuant(8, learn=True)
        act.calibrating = True
        act(x * 0.5)                 # calibrated on a smaller range: x saturates
        act.finish_calibration()
        act.train(mode == 'train')
        act(x).square().sum().backward()
        grads[mode] = float(act.scale.grad)
    assert grads['train'] != 0.0
    # LSQ: the train-mode gradient is the plain one scaled by 1 / sqrt(numel * qmax).
    assert grads['train'] == pytest.approx(grads['eval'] / math.sqrt(x.numel() * 127),
                                           rel=1e-4)


def test_qat_step_moves_weights_and_scales():
    q = quantize_model(random_bn_unet(), QuantConfig())
    x = inputs()
    calibrate(q, [x])
    before = copy.deepcopy(q.state_dict())
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=1e-3)
    q.train()
    q(x).square().mean().backward()
    assert all(float(m.scale.grad) != 0.0 for m in act_quantizers(q))
    opt.step()
    after = q.state_dict()
    assert not torch.equal(before['head.weight'], after['head.weight'])
    assert not torch.equal(before['q_in.scale'], after['q_in.scale'])


def test_study_scheme_is_refused_for_export():
    q = quantize_model(random_bn_unet(), QuantConfig(scheme='study'))
    calibrate(q, [inputs()])
    with pytest.raises(ValueError):
        freeze_for_export(q)


# Low-bit options: unsigned ReLU grids, least-error weight steps and activation ranges.

@pytest.mark.parametrize('kwargs, message', [
    ({'weight_clip': 'percentile'}, 'weight_clip='),
    ({'act_clip': 'entropy'}, 'act_clip='),
    ({'scheme': 'study', 'unsigned_relu': True}, 'belong to scheme'),
    ({'scheme': 'study', 'act_clip': 'mse'}, 'belong to scheme'),
    ({'first_layer_bits': 9}, 'first_layer_bits=9 outside'),
    ({'first_layer_bits': 1}, 'first_layer_bits=1 outside'),
    ({'scheme': 'study', 'first_layer_bits': 8}, 'belongs to scheme'),
])
def test_low_bit_option_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_unsigned_relu_puts_relu_outputs_on_twice_the_levels():
    q = quantize_model(random_bn_unet(), QuantConfig(weight_bits=4, act_bits=4,
                                                     unsigned_relu=True))
    modes = {name: m.mode for name, m in q.named_modules() if isinstance(m, ActQuant)}
    # The network input can be negative; ReLU outputs and their up-sampling/concat cannot.
    assert modes.pop('q_in') == 'symmetric'
    assert set(modes.values()) == {'unsigned'}
    assert any(name.endswith('q_up') for name in modes)
    calibrate(q, [inputs()])
    quant = dict(q.named_modules())['ups.0.q_cat']
    assert quant.qbounds(4) == (0, 15)
    x = torch.linspace(0, float(quant.running_max), 1000)
    levels = torch.unique(quant(x).detach())
    assert len(levels) == 16 and float(levels.min()) == 0.0
    # The same tensor on a signed grid has 8 non-negative levels (0..7).
    signed = ActQuant(4, mode='symmetric')
    signed.scale.data.fill_(float(quant.running_max) / 7)
    signed.calibrated.fill_(True)
    assert len(torch.unique(signed(x).detach())) == 8


def test_unsigned_relu_keeps_a_transposed_convs_output_signed():
    model = UNet(UNetConfig(**dict(TINY, up='transposed'))).eval()
    q = quantize_model(model, QuantConfig(act_bits=4, unsigned_relu=True))
    modes = {name: m.mode for name, m in q.named_modules() if isinstance(m, ActQuant)}
    assert all(mode == 'symmetric' for name, mode in modes.items()
               if name.endswith(('q_up', 'q_cat')))


def test_mse_weight_step_errs_less_than_max_at_4_bits():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[:, 0, 0, 0] = 8.0    # one outlier per output channel
    errors = {}
    for clip in ('max', 'mse'):
        q = QConv2d.from_conv(conv, 4, True, clip)
        scale = q.weight_scale()
        assert scale.shape == (8,)
        errors[clip] = float(((q.quantized_weight() - conv.weight) ** 2).sum().detach())
    assert errors['mse'] < 0.85 * errors['max']
    # Never a coarser grid than max|w| / qmax, and integers stay inside +-qmax.
    q = QConv2d.from_conv(conv, 4, True, 'mse')
    assert torch.all(q.weight_scale() <= QConv2d.from_conv(conv, 4, True).weight_scale() + 1e-7)
    ints = q.quantized_weight().detach() / q.weight_scale().view(-1, 1, 1, 1)
    assert float(ints.abs().max()) <= 7 + 1e-4


def test_mse_act_range_clips_outliers_and_errs_less():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 256))
    x[0, 0] = 60.0     # one outlier stretches a max-calibrated 4-bit grid
    errs = {}
    for clip in ('max', 'mse'):
        quant = ActQuant(4, mode='unsigned', clip=clip)
        quant.calibrating = True
        quant(x)
        quant.finish_calibration()
        assert quant._samples == []
        errs[clip] = float(((quant(x) - x) ** 2).mean().detach())
        if clip == 'mse':
            assert float(quant.scale.detach()) * 15 < 30.0
        else:
            assert float(quant.scale.detach()) * 15 == pytest.approx(60.0)
    assert errs['mse'] < 0.5 * errs['max']


def test_freeze_clips_weights_outside_the_mse_range_for_int8_export():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 2, 3)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[0, 0, 0, 0] = 50.0
    q = QConv2d.from_conv(conv, 8, True, 'mse')
    before = q.quantized_weight().detach().clone()
    q.freeze()
    bound = 127 * q.frozen_scale.view(-1, 1, 1, 1)
    assert torch.all(q.weight.abs() <= bound + 1e-6)
    # The clipped shadow weights quantize to the same integers the trained ones did.
    torch.testing.assert_close(q.quantized_weight(), before)


def test_unsigned_activations_refuse_int8_qdq_export():
    q = quantize_model(random_bn_unet(), QuantConfig(unsigned_relu=True))
    calibrate(q, [inputs()])
    with pytest.raises(ValueError, match='signed symmetric'):
        freeze_for_export(q)


def test_weight_step_follows_the_weights_and_survives_inference_mode():
    torch.manual_seed(0)
    q = QConv2d.from_conv(nn.Conv2d(3, 4, 3), 4, True, 'mse')
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        q.eval()
        q(x)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    before = q.weight_scale().clone()
    q(x).square().sum().backward()   # after evaluation under inference_mode: no error
    opt.step()
    after = q.weight_scale()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, q._weight_scale())
    q.bits = 3
    torch.testing.assert_close(q.weight_scale(), q._weight_scale())


@pytest.mark.parametrize('build', [
    lambda: random_bn_unet(),
    lambda: UNet(UNetConfig(**dict(TINY, variant='classic'))).eval(),
    lambda: FlowNetS(FlowNetConfig(width=0.0625, levels=3)).eval(),
], ids=['unet-fast', 'unet-classic', 'flownets'])
def test_first_layer_bits_widen_the_input_and_the_conv_it_feeds(build):
    model = build()
    channels = 6 if isinstance(model, FlowNetS) else 3
    x = torch.randn(2, channels, 64, 128, generator=torch.Generator().manual_seed(3))
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, first_layer_bits=8))
    link_bias_quantizers(q, x[:1])
    widened = [m for m in q.modules() if isinstance(m, QConv2d) and m.bits == 8]
    # Exactly one conv is widened, and it is the one the network input feeds.
    assert len(widened) == 1 and widened[0].input_quant() is q.q_in
    assert q.q_in.bits == 8
    assert {m.bits for m in q.modules() if isinstance(m, ActQuant) and m is not q.q_in} == {4}
    calibrate(q, [x])
    # The input is rounded on 255 levels, not 15.
    assert len(torch.unique(q.q_in(x).detach())) > 100


def test_first_layer_bits_need_an_input_quantizer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match='needs a model with an input quantizer'):
        quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, first_layer_bits=8))
