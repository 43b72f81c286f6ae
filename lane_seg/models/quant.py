"""
Fake quantization for post-training quantization (PTQ) and quantization-aware training (QAT).

The scheme is the one TensorRT's explicit quantization accepts: symmetric signed integers with
zero point 0, per-output-channel scales for weights, one scale per activation tensor. Weights
keep full-precision shadow copies; the forward pass sees them quantized, the backward pass goes
straight through (STE). Activation scales are calibrated (max of |x| over calibration batches)
and, in QAT, learned (LSQ-style gradients) — the "learned clipping ranges" improvement over
fixed ranges. Bit widths 2..8 run in PyTorch for the accuracy studies; 8-bit models export to
QuantizeLinear/DequantizeLinear ONNX.

Two options for low bit widths (studies; they are not TensorRT's int8 form):
``unsigned_relu`` puts the activations that cannot be negative (after a ReLU, and their
bilinear up-sampling and concatenation) on an unsigned grid [0, 2^b - 1], twice the levels a
signed grid spends on them (a signed 4-bit ReLU output has 8 levels, 0..7; unsigned 16);
``weight_clip='mse'`` picks each output channel's weight step by the least squared rounding
and clipping error instead of max|w| / qmax (at 4 bits a few outlying weights otherwise
stretch the grid over all the others); ``act_clip='mse'`` calibrates each activation range the
same way, on a sample of the calibration activations, instead of at their maximum (a 4-bit grid
spread to the largest activation ever seen rounds most of them to zero: one such layer of the
lane U-Net alone cost 23 IoU points at 4 bits).

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
    scheme: str = 'ours'        # 'ours' (above) or 'study' (the FPGA FlowNetS paper's)
    unsigned_relu: bool = False  # 'ours': non-negative activations on [0, 2^b - 1]
    weight_clip: str = 'max'    # 'max' (max|w| / qmax) or 'mse' (least-error step) per channel
    act_clip: str = 'max'       # calibrated activation range: 'max' or 'mse' (least error)
    first_layer_bits: int = 0   # the input and the first conv's weights at this width (0: same)

    def __post_init__(self):
        if self.scheme not in ('ours', 'study'):
            raise ValueError(f"scheme={self.scheme!r} must be 'ours' or 'study'")
        for name in ('weight_clip', 'act_clip'):
            if getattr(self, name) not in CLIPS:
                raise ValueError(f'{name}={getattr(self, name)!r} must be one of {CLIPS}')
        if self.scheme == 'study' and (self.unsigned_relu or self.weight_clip != 'max'
                                       or self.act_clip != 'max'):
            raise ValueError("unsigned_relu and the 'mse' clips belong to scheme 'ours' (the "
                             'study scheme has its own ranges)')
        for name in ('weight_bits', 'act_bits'):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ValueError(f'{name}={bits} outside 2..8')
        if self.first_layer_bits and not 2 <= self.first_layer_bits <= 8:
            raise ValueError(f'first_layer_bits={self.first_layer_bits} outside 2..8 (0: the '
                             'same widths as the other layers)')
        if self.first_layer_bits and self.scheme == 'study':
            raise ValueError("first_layer_bits belongs to scheme 'ours' (the study scheme "
                             'quantizes no network input)')

    def to_dict(self) -> dict:
        return asdict(self)


CLIPS = ('max', 'mse')
ACT_MODES = ('symmetric', 'unsigned', 'sigma4')
# Clip ratios (of max|w|) tried by weight_clip='mse'.
_CLIP_RATIOS = torch.linspace(0.3, 1.0, 36)
# Clip ratios (of max|x|) tried by act_clip='mse': activations can be far more heavy-tailed.
_ACT_CLIP_RATIOS = torch.logspace(-2, 0, 61)
# Activation values kept per calibration batch for act_clip='mse'.
_ACT_SAMPLE = 1 << 15


def qrange(bits: int):
    """Symmetric signed range with zero point 0 (e.g. -127..127 at 8 bits: narrow range)."""
    q = 2 ** (bits - 1) - 1
    return -q, q


class ActQuant(nn.Module):
    """
    Per-tensor activation fake-quantizer with a calibrated or learned scale.

    ``mode='symmetric'``: signed, zero point 0, range +-max|x| (TensorRT's form).
    ``mode='unsigned'``: zero point 0, range [0, max x] on 2^b - 1 steps, learned like
    'symmetric' (for tensors that cannot be negative; low-bit studies).
    ``mode='sigma4'``: the FlowNetS study's unsigned range [0, 4 sigma] after BN + ReLU.
    ``batch_share``: this process's fraction of the global batch (set per step by distributed
    training, 1 otherwise), so the LSQ gradient scale is the one of the global batch.
    """

    batch_share = 1.0

    def __init__(self, bits=8, learn=True, mode='symmetric', clip='max'):
        super().__init__()
        if clip not in CLIPS:
            raise ValueError(f'clip={clip!r} must be one of {CLIPS}')
        self.clip = clip
        self._samples = []
        self.bits = bits
        if mode not in ACT_MODES:
            raise ValueError(f'mode={mode!r} must be one of {ACT_MODES}')
        self.learn = learn and mode != 'sigma4'
        self.mode = mode
        self.register_buffer('moments', torch.zeros(3, dtype=torch.float64))
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=self.learn)
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
                xd = x.detach().double()
                self.moments += torch.stack([xd.new_tensor(float(xd.numel())), xd.sum(),
                                             (xd * xd).sum()])
                if self.clip == 'mse':
                    flat = x.detach().flatten()
                    pick = torch.randint(0, flat.numel(), (min(_ACT_SAMPLE, flat.numel()),),
                                         device=flat.device)
                    self._samples.append(flat[pick].float())
            return x
        if not self.enabled or not bool(self.calibrated):
            return x
        qmin, qmax = self.qbounds(self.bits)
        scale = self.scale.abs() + 1e-8
        if self.learn and self.training:
            # LSQ: gradient to the scale scaled by 1 / sqrt(numel * qmax), numel counted over
            # the whole batch when this process holds a share of it (distributed training).
            g = 1.0 / math.sqrt(x.numel() / self.batch_share * qmax)
            scale = scale * g + (scale - scale * g).detach()
        return _fake_quant(x, scale, qmin, qmax)

    def freeze(self):
        """Fix the calibrated or learned step as a Python constant for ONNX export."""
        self.frozen_scale = (float(self.scale.detach().abs()) + 1e-8
                             if bool(self.calibrated) and self.enabled else None)

    def qbounds(self, bits: int):
        """Integer range at ``bits``: signed narrow (symmetric) or [0, 2^b - 1]."""
        return qrange(bits) if self.mode == 'symmetric' else (0, 2 ** bits - 1)

    def finish_calibration(self):
        with torch.no_grad():
            if self.mode == 'sigma4':
                n, s1, s2 = self.moments.tolist()
                sigma = max((s2 / max(n, 1) - (s1 / max(n, 1)) ** 2), 0.0) ** 0.5
                self.scale.fill_(max(4.0 * sigma, 1e-4) / (2 ** self.bits - 1))
            else:
                qmin, qmax = self.qbounds(self.bits)
                amax = torch.clamp(self.running_max, min=1e-4)
                if self.clip == 'mse' and self._samples:
                    amax = _mse_clip(torch.cat(self._samples), amax, qmin, qmax)
                self.scale.copy_(amax / qmax)
            self._samples = []
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
    clip = 'max'         # 'max' or 'mse' (QuantConfig.weight_clip)
    frozen_scale = None
    frozen_bias = None
    unit_range = False   # study scheme: weights clipped to [-1, 1], scale 1 / qmax

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int, per_channel: bool,
                  clip: str = 'max') -> 'QConv2d':
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
        q.clip = clip
        return q

    def weight_scale(self):
        """
        Return the per-output-channel step, computed once per version of the weights.

        Evaluation asks for it twice per forward (the weight grid and the bias grid); the
        ``'mse'`` search is worth doing once. An optimizer step or a loaded state dict changes
        the weights' version, a new width or clip changes the key; a step computed under
        ``torch.inference_mode`` is not reused outside it (autograd refuses inference tensors).
        """
        key = (self.weight._version, self.weight.data_ptr(), self.bits, self.clip,
               self.per_channel, self.unit_range, torch.is_inference_mode_enabled())
        cached = self.__dict__.get('_scale_cache')
        if cached is None or cached[0] != key:
            cached = (key, self._weight_scale())
            self.__dict__['_scale_cache'] = cached
        return cached[1]

    def _weight_scale(self):
        qmax = qrange(self.bits)[1]
        w = self.weight.detach()
        if self.unit_range:
            return torch.full((w.shape[0],), 1.0 / qmax, device=w.device)
        if self.clip == 'mse':
            return _mse_weight_scale(w, qmax, self.per_channel)
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

    def freeze(self):
        """
        Fix the weight step and the bias for ONNX export.

        Weights outside the clipping range (``clip='mse'``) are clipped here, so the int8
        QuantizeLinear (which saturates at -128..127, not at +-qmax) sees the trained integers.
        """
        scale = self.weight_scale().float().clone()
        bound = (qrange(self.bits)[1] * scale).view(-1, 1, 1, 1)
        with torch.no_grad():
            self.weight.copy_(torch.maximum(torch.minimum(self.weight, bound), -bound))
        self.frozen_scale = scale
        self.frozen_bias = self.quantized_bias().detach().clone()

    def input_quant(self):
        """Return the ActQuant feeding this conv (linked by ``link_bias_quantizers``)."""
        ref = self.__dict__.get('_input_quant')
        return ref() if ref is not None else None

    def quantized_bias(self):
        """
        Bias on the int32 grid of input scale x weight scale, as integer kernels use it.

        ONNX Runtime's QLinearConv (and TensorRT) add the bias in int32 with that scale; the
        fake-quantized model rounds it the same way so both compute the same numbers.
        """
        quant = self.input_quant()
        if quant is None or not bool(quant.calibrated) or not quant.enabled:
            return self.bias
        # The activation scale is learned by its own quantizer (LSQ); the bias path must not
        # push it with an unscaled gradient, so the grid is a constant here.
        step = (quant.scale.detach().abs() + 1e-8) * self.weight_scale()
        q = self.bias / step
        return (q + (torch.round(q) - q).detach()) * step

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            bias = self.frozen_bias if self.frozen_bias is not None else self.bias
            return self._conv_forward(x, self.quantized_weight(), bias)
        # Training keeps the float bias (its int32 grid is ~1e-5 of the output range and its
        # rounding would only add discontinuities); evaluation and export use the integer
        # kernels' rounded bias, so torch and the deployed engines compute the same numbers.
        bias = self.bias if self.training else self.quantized_bias()
        return self._conv_forward(x, self.quantized_weight(), bias)


@torch.no_grad()
def _mse_clip(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Return the clipping bound (ratio x ``amax``) whose fake quantization of ``x`` errs least."""
    bounds = _ACT_CLIP_RATIOS.to(x.device, x.dtype) * amax.to(x.dtype)
    errors = torch.stack([((torch.clamp(torch.round(x / (b / qmax)), qmin, qmax) * (b / qmax)
                            - x) ** 2).sum() for b in bounds])
    return bounds[errors.argmin()].to(amax.dtype)


@torch.no_grad()
def _mse_weight_scale(w: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """Per output channel, the step (clip ratio x max|w| / qmax) with least squared error."""
    flat = w.flatten(1) if per_channel else w.reshape(1, -1)
    amax = torch.clamp(flat.abs().max(dim=1).values, min=1e-8)
    steps = _CLIP_RATIOS.to(w.device, w.dtype).view(-1, 1) * amax / qmax    # (R, C)
    q = torch.clamp(torch.round(flat / steps[..., None]), -qmax, qmax) * steps[..., None]
    best = ((q - flat) ** 2).sum(dim=2).argmin(dim=0)                        # (C,)
    scale = steps.gather(0, best.view(1, -1)).squeeze(0)
    return scale if per_channel else scale.expand(w.shape[0])


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
    """
    Return ``model`` made fake-quantized in place.

    ``ours``: BN folded, per-channel weight scales, learned symmetric activation ranges on
    every tensor that feeds a conv. ``study``: BN kept (BN + ReLU before every quantizer),
    weights clipped to [-1, 1] on a uniform grid, activations after ReLU in [0, 4 sigma].
    With ``unsigned_relu`` the ReLU outputs, and the bilinear up-sampling and concatenation of
    them, are quantized unsigned; the network input (and a transposed conv's output) stays
    signed. ``first_layer_bits`` sets the input quantizer's and the first conv's widths.
    """
    model.eval()
    study = qcfg.scheme == 'study'
    if not study:
        fold_batchnorm(model)
    relu_mode = 'sigma4' if study else 'unsigned' if qcfg.unsigned_relu else 'symmetric'
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and not isinstance(child, QConv2d):
                q = QConv2d.from_conv(child, qcfg.weight_bits, qcfg.per_channel,
                                      qcfg.weight_clip)
                q.unit_range = study
                setattr(module, child_name, q)
            elif isinstance(child, nn.ReLU):
                act = ActQuant(qcfg.act_bits, qcfg.learn_scales, relu_mode, qcfg.act_clip)
                setattr(module, child_name, nn.Sequential(nn.ReLU(), act))
    # Quantization points that are not after a ReLU: the input, up-sampling, concatenation.
    for module in model.modules():
        # Bilinear up-sampling and concatenation of ReLU outputs are non-negative too.
        relu_fed = relu_mode if getattr(module, 'transposed', None) is None else 'symmetric'
        for attr, mode in (('q_in', 'symmetric'), ('q_up', relu_fed), ('q_cat', relu_fed)):
            if not study and isinstance(getattr(module, attr, None), nn.Identity):
                setattr(module, attr, ActQuant(qcfg.act_bits, qcfg.learn_scales, mode,
                                               qcfg.act_clip))
    if qcfg.first_layer_bits:
        _set_first_layer_bits(model, qcfg.first_layer_bits)
    model.quant_config = qcfg
    return model


def _set_first_layer_bits(model: nn.Module, bits: int):
    """
    Give the network input's quantizer and the first convolution's weights ``bits``.

    The first layer sees the raw image: at 4 bits its input quantizer and its weights were the
    lane U-Net's most sensitive points after the activation ranges (4.4 and 3.1 IoU points),
    for a few hundred weights. The first conv is the first one registered (the models declare
    their layers in data-flow order; tests check it is the one ``q_in`` feeds).
    """
    q_in = getattr(model, 'q_in', None)
    first = next((m for m in model.modules() if isinstance(m, QConv2d)), None)
    if not isinstance(q_in, ActQuant) or first is None:
        raise ValueError('first_layer_bits needs a model with an input quantizer (q_in) and a '
                         f'convolution; {type(model).__name__} has not')
    q_in.bits = bits
    first.bits = bits


def check_signed_symmetric(model: nn.Module):
    """Raise unless every quantizer has the signed symmetric form int8 QDQ export needs."""
    for m in model.modules():
        if (isinstance(m, ActQuant) and m.mode != 'symmetric') or getattr(m, 'unit_range', 0):
            raise ValueError('ONNX QDQ export needs signed symmetric activations (the study '
                             'scheme and unsigned_relu are for accuracy studies)')


def freeze_for_export(model: nn.Module) -> nn.Module:
    """Turn learned/calibrated scales into Python constants for ONNX export (8 bits only)."""
    check_signed_symmetric(model)
    for m in model.modules():
        if isinstance(m, ActQuant):
            if m.bits != 8 and bool(m.calibrated) and m.enabled:
                raise ValueError(f'ONNX QDQ export needs 8-bit activations, got {m.bits}')
            m.freeze()
        elif isinstance(m, QConv2d):
            if m.bits != 8:
                raise ValueError(f'ONNX QDQ export needs 8-bit weights, got {m.bits}')
            m.freeze()
    return model


def link_bias_quantizers(model: nn.Module, example) -> int:
    """
    Link every QConv2d to the ActQuant that produces its input (one traced forward).

    Returns the number of convs linked; convs fed by anything else (e.g. a max-pool) keep a
    float bias.
    """
    import weakref
    produced = {}
    hooks = []

    def after_quant(module, inputs, output):
        produced[id(output)] = module

    def before_conv(module, inputs):
        quant = produced.get(id(inputs[0]))
        module.__dict__['_input_quant'] = weakref.ref(quant) if quant is not None else None

    for m in model.modules():
        if isinstance(m, ActQuant):
            hooks.append(m.register_forward_hook(after_quant))
        elif isinstance(m, QConv2d):
            hooks.append(m.register_forward_pre_hook(before_conv))
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return sum(1 for m in model.modules() if isinstance(m, QConv2d) and m.input_quant())


def act_quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(model: nn.Module, batches, reduce=None, example=None) -> int:
    """
    Set activation scales from the max |x| seen over ``batches`` (PTQ); returns the count.

    ``reduce(quantizers)`` (distributed training) pools the observed ranges and moments over
    the ranks before the scales are set. ``example`` is the input the bias quantizers are
    linked with (default: the first sample of the last batch; a rank that saw no batch needs
    one).
    """
    quants = act_quantizers(model)
    for q in quants:
        q.calibrating = True
        q.running_max.zero_()
        q.moments.zero_()
        q._samples = []
    model.eval()
    n = 0
    for x in batches:
        model(x)
        n += 1
    if reduce is not None:
        reduce(quants)
    for q in quants:
        q.finish_calibration()
    if example is None and n:
        example = x[:1]
    if example is not None:
        link_bias_quantizers(model, example)
    return n


def quant_summary(model: nn.Module) -> dict:
    """Per-layer bit widths (for metadata and MCU/FPGA sizing tables)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, QConv2d)]
    return {
        'weights': {name: m.bits for name, m in convs},
        'activations': {name: m.bits for name, m in model.named_modules()
                        if isinstance(m, ActQuant)},
    }
