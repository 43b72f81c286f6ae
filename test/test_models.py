"""The U-Net family and the quantizable FlowNetS: sizes, shapes, config checks and MACs."""

from helpers import TINY
from lane_seg.models.flownet import FlowNetConfig, FlowNetS
from lane_seg.models.layers import count_macs, count_parameters
from lane_seg.models.unet import UNet, UNetConfig
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('levels, millions', [(4, 31.4), (3, 7.8), (2, 1.9), (1, 0.41)])
def test_classic_unet_family_parameter_counts(levels, millions):
    # The study's family (base 64): counted on the meta device, no memory, no forward.
    with torch.device('meta'):
        model = UNet(UNetConfig(levels=levels, base=64, variant='classic'))
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.02)


def test_parameters_shrink_level_by_level():
    with torch.device('meta'):
        counts = [count_parameters(UNet(UNetConfig(levels=n, base=64, variant='classic')))
                  for n in (1, 2, 3, 4)]
    assert counts == sorted(counts) and len(set(counts)) == 4


@pytest.mark.parametrize('cfg, out_hw', [
    (UNetConfig(**TINY), (32, 64)),
    (UNetConfig(levels=2, base=4, variant='fast', separable=True), (32, 64)),
    (UNetConfig(levels=1, base=4, variant='fast', up='transposed'), (32, 64)),
    (UNetConfig(levels=2, base=4, variant='classic'), (64, 128)),
    (UNetConfig(levels=1, base=4, variant='classic', up='transposed', batchnorm=False),
     (64, 128)),
])
def test_unet_output_shape(cfg, out_hw):
    model = UNet(cfg).eval()
    assert 64 % cfg.total_stride == 0 and 128 % cfg.total_stride == 0
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 128))
    assert tuple(y.shape) == (2, 1, *out_hw)
    assert (64 // cfg.output_stride, 128 // cfg.output_stride) == out_hw
    assert torch.isfinite(y).all()


def test_unet_strides():
    assert UNetConfig(**TINY).total_stride == 8
    assert UNetConfig(levels=3, variant='classic').total_stride == 8
    assert UNetConfig(levels=4, variant='fast').total_stride == 64


@pytest.mark.parametrize('kwargs, message', [
    ({'levels': 0}, 'levels=0'),
    ({'levels': 5}, 'levels=5'),
    ({'base': 3}, 'base=3'),
    ({'up': 'nearest'}, 'up='),
    ({'variant': 'tiny'}, 'variant='),
])
def test_unet_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_unet_config_round_trips_through_dict():
    cfg = UNetConfig(levels=2, base=8, up='transposed', variant='classic')
    assert UNetConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize('levels', [3, 4])
def test_flownets_output_is_quarter_resolution(levels):
    cfg = FlowNetConfig(width=0.0625, levels=levels)
    model = FlowNetS(cfg).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 6, 64, 128))
    assert tuple(y.shape) == (2, 2, 16, 32)
    assert cfg.output_stride == 4 and cfg.total_stride == 2 ** levels


def test_flownets_channels_follow_the_width_multiplier():
    assert FlowNetConfig(width=1.0, levels=6).channels() == [64, 128, 256, 512, 512, 1024]
    assert FlowNetConfig(width=0.5, levels=4).channels() == [32, 64, 128, 256]
    assert FlowNetConfig(width=0.0625, levels=3).channels() == [8, 8, 16]   # at least 8


@pytest.mark.parametrize('kwargs, message', [
    ({'levels': 2}, 'levels=2'),
    ({'levels': 7}, 'levels=7'),
    ({'width': 0.01}, 'width=0.01'),
    ({'width': 3.0}, 'width=3.0'),
])
def test_flownet_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowNetConfig(**kwargs)


def test_count_macs_matches_a_hand_computation():
    toy = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 2, 1, stride=2))
    # conv1: 4 x 8 x 8 outputs, 3 x 3 x 3 MACs each; conv2: 2 x 4 x 4 outputs, 4 MACs each.
    assert count_macs(toy, (1, 3, 8, 8)) == 4 * 8 * 8 * 27 + 2 * 4 * 4 * 4 == 7040


def test_count_macs_grouped_and_transposed_convs():
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert count_macs(depthwise, (1, 4, 8, 8)) == 4 * 8 * 8 * 9
    tconv = nn.ConvTranspose2d(2, 3, 2, stride=2)
    # Every input value meets 2 x 2 x 3 weights.
    assert count_macs(tconv, (1, 2, 4, 4)) == 2 * 4 * 4 * 4 * 3


def test_count_macs_keeps_the_training_mode():
    model = UNet(UNetConfig(**TINY)).train()
    macs = count_macs(model, (1, 3, 64, 128))
    assert model.training and macs > 0
    # Doubling the pixels doubles the MACs of a fully convolutional network.
    assert count_macs(model, (1, 3, 128, 128)) == 2 * macs
