"""
The lane U-Net family: classic U-Nets of 1 to 4 levels and a fast CPU variant.

``classic`` is Ronneberger's U-Net (two 3x3 conv + BN + ReLU per stage, max-pool down,
bilinear or transposed up, skip concatenation), shrunk level by level as in the embedded
CloudNet study (4/3/2/1 levels). ``fast`` is built for 2 CPU cores: a fast-downsampling stem
(stride 4 in two layers, as Fd-MobileNet does early), depthwise-separable stages, bilinear
up-sampling, and logits at half the input resolution (the post-processing resizes them to the
camera's resolution anyway).
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import ConvBNReLU, SeparableConv, upsample2


@dataclass(frozen=True)
class UNetConfig:
    """One member of the family."""

    levels: int = 3            # down-sampling levels, 1..4
    base: int = 16             # channels of the first stage; doubles per level
    batchnorm: bool = True
    up: str = 'bilinear'       # 'bilinear' or 'transposed'
    variant: str = 'fast'      # 'classic' or 'fast'
    separable: bool = True     # fast variant: depthwise-separable (True) or dense 3x3 convs
    in_channels: int = 3
    out_channels: int = 1

    def __post_init__(self):
        if not 1 <= self.levels <= 4:
            raise ValueError(f'levels={self.levels} outside 1..4')
        if self.base < 4:
            raise ValueError(f'base={self.base} must be >= 4')
        if self.up not in ('bilinear', 'transposed'):
            raise ValueError(f"up={self.up!r} must be 'bilinear' or 'transposed'")
        if self.variant not in ('classic', 'fast'):
            raise ValueError(f"variant={self.variant!r} must be 'classic' or 'fast'")

    @property
    def total_stride(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** self.levels * (4 if self.variant == 'fast' else 1)

    @property
    def output_stride(self) -> int:
        """Input pixels per output pixel."""
        return 2 if self.variant == 'fast' else 1

    def to_dict(self) -> dict:
        return asdict(self)


class _Up(nn.Module):

    def __init__(self, cin, cskip, cout, up, block):
        super().__init__()
        self.transposed = nn.ConvTranspose2d(cin, cin, 2, 2) if up == 'transposed' else None
        self.block = block(cin + cskip, cout)
        self.q_up = nn.Identity()    # quantization points (see models.quant)
        self.q_cat = nn.Identity()

    def forward(self, x, skip):
        x = self.transposed(x) if self.transposed is not None else upsample2(x)
        x = self.q_up(x)
        return self.block(self.q_cat(torch.cat([x, skip], dim=1)))


class UNet(nn.Module):
    """Lane-boundary segmenter: image (N, 3, H, W) -> logits (N, 1, H/s, W/s)."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        bn = cfg.batchnorm
        widths = [cfg.base * 2 ** i for i in range(cfg.levels + 1)]
        if cfg.variant == 'classic':
            def block(cin, cout):
                return nn.Sequential(ConvBNReLU(cin, cout, batchnorm=bn),
                                     ConvBNReLU(cout, cout, batchnorm=bn))
            self.stem = block(cfg.in_channels, widths[0])
            self.downs = nn.ModuleList(
                nn.Sequential(nn.MaxPool2d(2), block(widths[i], widths[i + 1]))
                for i in range(cfg.levels))
        else:
            def conv(cin, cout, stride=1):
                if cfg.separable:
                    return SeparableConv(cin, cout, stride, batchnorm=bn)
                return ConvBNReLU(cin, cout, 3, stride, batchnorm=bn)

            def block(cin, cout):
                return conv(cin, cout)
            # Fast down-sampling: 1/2 after a full 3x3 conv, 1/4 after a second strided conv.
            self.stem = nn.Sequential(ConvBNReLU(cfg.in_channels, widths[0], 3, 2, batchnorm=bn))
            self.stem4 = conv(widths[0], widths[0], stride=2)
            self.downs = nn.ModuleList(
                nn.Sequential(conv(widths[i], widths[i + 1], stride=2),
                              conv(widths[i + 1], widths[i + 1]))
                for i in range(cfg.levels))
        self.ups = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], cfg.up, block)
            for i in reversed(range(cfg.levels)))
        if cfg.variant == 'fast':
            self.up_half = _Up(widths[0], widths[0], widths[0], cfg.up, block)
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)
        self.q_in = nn.Identity()

    def forward(self, x):
        x = self.q_in(x)
        if self.cfg.variant == 'classic':
            skips = [self.stem(x)]
        else:
            half = self.stem(x)
            skips = [self.stem4(half)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        if self.cfg.variant == 'fast':
            y = self.up_half(y, half)
        return self.head(y)
