"""
Fake quantization for post-training quantization (PTQ) and quantization-aware training (QAT).

The scheme is the one TensorRT's explicit quantization accepts: symmetric signed integers with
zero point 0, per-output-channel scales for weights, one scale per activation tensor. Weights
keep full-precision shadow copies; the forward pass sees them quantized, the backward pass goes
straight through (STE). Activation scales are calibrated (max of |x| over calibration batches)
and, in QAT, learned (LSQ-style gradients) — the "learned clipping ranges" improvement over
fixed ranges. Bit widths 2..8 run in PyTorch for the accuracy studies; 8-bit models export to
QuantizeLinear/DequantizeLinear ONNX.

``quantize_model(model, QuantConfig(...))`` folds BatchNorm into the convolutions (BN before
every quantizer, then folded: one integer conv per layer), swaps every Conv2d for a QConv2d and
puts an activation quantizer on the network input and after every ReLU, up-sampling and
concatenation (each tensor that feeds a conv is quantized exactly once).
"""

from dataclasses import asdict, dataclass
import math

import torch
from torch import nn

from .layers import ConvBNReLU


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and granularity."""

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    learn_scales: bool = True   # LSQ-style learned activation ranges during QAT

    def __post_init__(self):
        for name in ('weight_bits', 'act_bits'):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ValueError(f'{name}={bits} outside 2..8')

    def to_dict(self) -> dict:
        return asdict(self)


def qrange(bits: int):
    """Symmetric signed range with zero point 0 (e.g. -127..127 at 8 bits: narrow range)."""
    q = 2 ** (bits - 1) - 1
    return -q, q


class ActQuant(nn.Module):
    """Per-tensor symmetric activation fake-quantizer with a calibrated or learned scale."""

    def __init__(self, bits=8, learn=True):
        super().__init__()
        self.bits = bits
        self.learn = learn
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=learn)
        self.register_buffer('calibrated', torch.tensor(False))
        self.register_buffer('running_max', torch.tensor(0.0))
        self.calibrating = False
        self.enabled = True
        self.frozen_scale = None

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            # Python constants only (set by freeze_for_export): a clean QDQ pair in the graph.
            if self.frozen_scale is None:
                return x
            # ONNX's int8 QuantizeLinear saturates to [-128, 127]; the scale keeps the
            # calibrated range at +-127 (narrow, symmetric), so both agree inside it.
            return torch.fake_quantize_per_tensor_affine(x, self.frozen_scale, 0, -128, 127)
        if self.calibrating:
            with torch.no_grad():
                self.running_max.copy_(torch.maximum(self.running_max, x.detach().abs().max()))
            return x
        if not self.enabled or not bool(self.calibrated):
            return x
        qmin, qmax = qrange(self.bits)
        scale = self.scale.abs() + 1e-8
        if self.learn and self.training:
            # LSQ: gradient to the scale scaled by 1 / sqrt(numel * qmax).
            g = 1.0 / math.sqrt(x.numel() * qmax)
            scale = scale * g + (scale - scale * g).detach()
        return _fake_quant(x, scale, qmin, qmax)

    def finish_calibration(self):
        qmax = qrange(self.bits)[1]
        with torch.no_grad():
            self.scale.copy_(torch.clamp(self.running_max, min=1e-4) / qmax)
            self.calibrated.fill_(True)
        self.calibrating = False


def _fake_quant(x, scale, qmin, qmax):
    """Round-to-nearest fake quantization with straight-through gradients to x and scale."""
    q = torch.clamp(x / scale, qmin, qmax)
    q = q + (torch.round(q) - q).detach()
    return q * scale


class QConv2d(nn.Conv2d):
    """Conv2d whose weights are fake-quantized per output channel (symmetric, zero point 0)."""

    bits = 8
    per_channel = True
    frozen_scale = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int, per_channel: bool) -> 'QConv2d':
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, bias=True)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
            else:
                q.bias.zero_()
        q.bits = bits
        q.per_channel = per_channel
        return q

    def weight_scale(self):
        qmax = qrange(self.bits)[1]
        w = self.weight.detach()
        if self.per_channel:
            amax = w.abs().flatten(1).max(dim=1).values
        else:
            amax = w.abs().max().expand(w.shape[0])
        return torch.clamp(amax, min=1e-8) / qmax

    def quantized_weight(self):
        qmin, qmax = qrange(self.bits)
        scale = self.weight_scale()
        if torch.onnx.is_in_onnx_export():
            # Constant scales (frozen buffers) so the exporter folds them; |w| <= 127 * scale,
            # so the ONNX int8 range never reaches -128.
            return torch.fake_quantize_per_channel_affine(
                self.weight, self.frozen_scale, torch.zeros_like(self.frozen_scale,
                                                                 dtype=torch.int32),
                0, -128, 127)
        return _fake_quant(self.weight, scale.view(-1, 1, 1, 1), qmin, qmax)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d + BatchNorm2d pair of ConvBNReLU blocks into one biased conv."""
    for module in model.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module[0], module[1]
            with torch.no_grad():
                std = torch.sqrt(bn.running_var + bn.eps)
                gamma = bn.weight / std
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                   conv.stride, conv.padding, conv.dilation, conv.groups,
                                   bias=True)
                folded.weight.copy_(conv.weight * gamma.view(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
                folded.bias.copy_((bias - bn.running_mean) * gamma + bn.bias)
            module[0] = folded
            module[1] = nn.Identity()
    return model


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Return ``model`` made fake-quantized in place (BN folded, QConv2d, ActQuant)."""
    model.eval()
    fold_batchnorm(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and not isinstance(child, QConv2d):
                setattr(module, child_name,
                        QConv2d.from_conv(child, qcfg.weight_bits, qcfg.per_channel))
            elif isinstance(child, nn.ReLU):
                setattr(module, child_name,
                        nn.Sequential(nn.ReLU(), ActQuant(qcfg.act_bits, qcfg.learn_scales)))
    # Quantization points that are not after a ReLU: the input, up-sampling, concatenation.
    for module in model.modules():
        for attr in ('q_in', 'q_up', 'q_cat'):
            if isinstance(getattr(module, attr, None), nn.Identity):
                setattr(module, attr, ActQuant(qcfg.act_bits, qcfg.learn_scales))
    model.quant_config = qcfg
    return model


def freeze_for_export(model: nn.Module) -> nn.Module:
    """Turn learned/calibrated scales into Python constants for ONNX export (8 bits only)."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            if m.bits != 8 and bool(m.calibrated) and m.enabled:
                raise ValueError(f'ONNX QDQ export needs 8-bit activations, got {m.bits}')
            m.frozen_scale = (float(m.scale.detach().abs()) + 1e-8
                              if bool(m.calibrated) and m.enabled else None)
        elif isinstance(m, QConv2d):
            if m.bits != 8:
                raise ValueError(f'ONNX QDQ export needs 8-bit weights, got {m.bits}')
            m.frozen_scale = m.weight_scale().float().clone()
    return model


def act_quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Set activation scales from the max |x| seen over ``batches`` (PTQ); returns count."""
    quants = act_quantizers(model)
    for q in quants:
        q.calibrating = True
        q.running_max.zero_()
    model.eval()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for q in quants:
        q.finish_calibration()
    return n


def quant_summary(model: nn.Module) -> dict:
    """Per-layer bit widths (for metadata and MCU/FPGA sizing tables)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, QConv2d)]
    return {
        'weights': {name: m.bits for name, m in convs},
        'activations': {name: m.bits for name, m in model.named_modules()
                        if isinstance(m, ActQuant)},
    }
