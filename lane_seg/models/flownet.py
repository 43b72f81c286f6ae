"""
FlowNetSimple made for quantization (after the FPGA study of quantized FlowNetS).

Changes from FlowNetS, as the study prescribes: BatchNorm + ReLU before every activation
quantizer (every conv is conv + BN + ReLU), bilinear up-sampling + conv instead of transposed
convolutions, and flow predicted only once, at the output (no multi-scale flow heads).
Two frames are stacked at the input (6 channels); the contracting part halves the resolution
``levels`` times with strided convs; the expanding part goes back up to 1/4 of the input with
skip connections; one 3x3 head predicts (u, v) in pixels of the input resolution divided by
``FLOW_DIV`` (so the head's outputs stay O(1), which suits quantization).
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import ConvBNReLU, upsample2

FLOW_DIV = 20.0   # head output x FLOW_DIV = pixels at the input resolution


@dataclass(frozen=True)
class FlowNetConfig:
    """Width multiplier and depth of the quantizable FlowNetSimple."""

    width: float = 0.5        # multiplier of FlowNetS' channel counts (64..1024)
    levels: int = 6           # contracting stages (FlowNetS: 6, down to 1/64)
    batchnorm: bool = True
    in_channels: int = 6

    def __post_init__(self):
        if not 3 <= self.levels <= 6:
            raise ValueError(f'levels={self.levels} outside 3..6')
        if not 0.05 <= self.width <= 2.0:
            raise ValueError(f'width={self.width} outside [0.05, 2]')

    @property
    def total_stride(self) -> int:
        return 2 ** self.levels

    @property
    def output_stride(self) -> int:
        return 4

    def channels(self):
        base = [64, 128, 256, 512, 512, 1024][:self.levels]
        return [max(8, int(round(c * self.width / 8)) * 8) for c in base]

    def to_dict(self) -> dict:
        return asdict(self)


class _UpBlock(nn.Module):

    def __init__(self, cin, cskip, cout, bn):
        super().__init__()
        self.conv = ConvBNReLU(cin + cskip, cout, 3, batchnorm=bn)
        self.q_up = nn.Identity()
        self.q_cat = nn.Identity()

    def forward(self, x, skip):
        x = self.q_up(upsample2(x))
        return self.conv(self.q_cat(torch.cat([x, skip], dim=1)))


class FlowNetS(nn.Module):
    """(N, 6, H, W) stacked frames -> (N, 2, H/4, W/4) flow / FLOW_DIV (input pixels)."""

    def __init__(self, cfg: FlowNetConfig = FlowNetConfig()):
        super().__init__()
        self.cfg = cfg
        bn = cfg.batchnorm
        ch = cfg.channels()
        kernels = [7, 5, 5, 3, 3, 3]
        self.q_in = nn.Identity()
        downs = []
        cin = cfg.in_channels
        for i, c in enumerate(ch):
            stage = [ConvBNReLU(cin, c, kernels[i], 2, batchnorm=bn)]
            if i >= 2:   # FlowNetS' conv3_1 .. conv6_1: a second conv at the same scale
                stage.append(ConvBNReLU(c, c, 3, batchnorm=bn))
            downs.append(nn.Sequential(*stage))
            cin = c
        self.downs = nn.ModuleList(downs)
        # Expanding part: from the deepest stage back to 1/4 (stage index 1).
        ups = []
        cur = ch[-1]
        for i in range(len(ch) - 2, 0, -1):
            out = max(8, ch[i] // 2)
            ups.append(_UpBlock(cur, ch[i], out, bn))
            cur = out
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(cur, 2, 3, padding=1)

    def forward(self, x):
        x = self.q_in(x)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)
