"""
Building blocks shared by the U-Net family and the flow network (torch only).

Every block is conv -> BatchNorm -> ReLU, the form that folds into one quantized conv:
BatchNorm before the activation quantizer, as the quantized FlowNetS study prescribes.
"""

import torch
from torch import nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + ReLU; ``groups=channels`` gives a depthwise conv."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, batchnorm=True, relu=True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                            bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (optionally strided) + pointwise 1x1, each with BN + ReLU."""

    def __init__(self, cin, cout, stride=1, batchnorm=True):
        super().__init__(ConvBNReLU(cin, cin, 3, stride, groups=cin, batchnorm=batchnorm),
                         ConvBNReLU(cin, cout, 1, batchnorm=batchnorm))


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """
    Bilinear 2x up-sampling (align_corners=False).

    A constant factor keeps the exported graph static (one Resize, no Shape/Slice ops);
    models therefore need input sizes divisible by their total stride.
    """
    return F.interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one forward pass (convs and linear layers), by hooks."""
    total = [0]

    def conv_hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        total[0] += output.numel() * k * module.in_channels // module.groups

    def tconv_hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        total[0] += inputs[0].numel() * k * module.out_channels // module.groups

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            hooks.append(m.register_forward_hook(tconv_hook))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(*input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return int(total[0])
