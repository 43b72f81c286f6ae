"""Checkpoints (safetensors + JSON): round trips, resumable optimizer state, refusals."""

import copy
import json

from helpers import FLOW, TINY
from lane_seg.models import checkpoint
from lane_seg.models.checkpoint import CheckpointError
from lane_seg.models.quant import act_quantizers, calibrate, QuantConfig, quantize_model
from lane_seg.train.flow import flow_metadata, FlowTrainConfig
from lane_seg.train.seg import lane_metadata, SegTrainConfig
import pytest
import torch

pytestmark = pytest.mark.usefixtures('one_thread')


def lane_meta(bits=0):
    return lane_metadata(SegTrainConfig(input_size=(64, 128), arch=dict(TINY), quant_bits=bits),
                         'lane')


def flow_meta(bits=0):
    return flow_metadata(FlowTrainConfig(input_size=(64, 128), arch=dict(FLOW),
                                         quant_bits=bits), 'flow')


def images(seed=0, n=2, channels=3):
    return torch.randn(n, channels, 64, 128, generator=torch.Generator().manual_seed(seed))


def trained_bn(model):
    """Give BatchNorm layers non-default statistics (one forward in train mode)."""
    model.train()
    with torch.no_grad():
        model(images(5, 4, model.cfg.in_channels) * 2 + 0.3)
    return model.eval()


@pytest.mark.parametrize('bits', [0, 8, 4])
def test_lane_round_trip_gives_identical_outputs(tmp_path, bits):
    meta = lane_meta(bits)
    torch.manual_seed(0)
    model = trained_bn(checkpoint.build_model(lane_meta(0)['architecture']))
    if bits:
        quantize_model(model, QuantConfig(**meta['architecture']['quant']))
        calibrate(model, [images()])
    path = checkpoint.save(tmp_path / 'lane.safetensors', model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lane.json', 'lane.safetensors']
    loaded, info = checkpoint.load_model(path, task='lane_segmentation')
    assert not loaded.training
    assert info['kind'] == checkpoint.KIND_MODEL
    assert info['architecture'] == json.loads(json.dumps(meta['architecture']))
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if bits:
        assert all(bool(m.calibrated) and not m.calibrating for m in act_quantizers(loaded))
        assert loaded.quant_config.weight_bits == bits


def test_flow_round_trip_gives_identical_outputs(tmp_path):
    meta = flow_meta(8)
    torch.manual_seed(0)
    model = trained_bn(checkpoint.build_model(flow_meta(0)['architecture']))
    quantize_model(model, QuantConfig(**meta['architecture']['quant']))
    x = images(2, channels=6)
    calibrate(model, [x])
    path = checkpoint.save(tmp_path / 'flow.safetensors', model, meta)
    loaded, _ = checkpoint.load_model(path, task='optical_flow')
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_optimizer_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    meta = lane_meta()
    model = checkpoint.build_model(meta['architecture']).train()

    def make_optimizer(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-4)

    def step(m, opt, seed):
        opt.zero_grad()
        m(images(seed)).square().mean().backward()
        opt.step()

    opt = make_optimizer(model)
    step(model, opt, 1)
    step(model, opt, 2)
    path = checkpoint.save(tmp_path / 'run.safetensors', model, meta, optimizer=opt,
                           extra={'epoch': 1, 'step': 2})
    resumed, info = checkpoint.load_model(path)
    assert info['kind'] == checkpoint.KIND_TRAINING
    assert (info['epoch'], info['step']) == (1, 2)
    resumed.train()
    opt2 = make_optimizer(resumed)
    tensors, info = checkpoint.read(path)
    checkpoint.restore_optimizer(opt2, tensors, info)
    # The uninterrupted run and the resumed one take the same third step.
    step(model, opt, 3)
    step(resumed, opt2, 3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert float(opt2.state_dict()['state'][0]['step']) == 3.0


def test_restore_optimizer_needs_optimizer_state(tmp_path):
    model = checkpoint.build_model(lane_meta()['architecture'])
    path = checkpoint.save(tmp_path / 'm.safetensors', model, lane_meta())
    tensors, info = checkpoint.read(path)
    with pytest.raises(CheckpointError, match='no optimizer state'):
        checkpoint.restore_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), tensors,
                                     info)


@pytest.fixture
def saved(tmp_path):
    model = checkpoint.build_model(lane_meta()['architecture'])
    return checkpoint.save(tmp_path / 'lane.safetensors', model, lane_meta())


@pytest.mark.parametrize('keep', [0.5, 0.0])
def test_truncated_checkpoint_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        checkpoint.load_model(saved)
    assert str(saved) in str(info.value)


def test_garbage_checkpoint_is_refused(saved):
    saved.write_bytes(b'\xff' * 64)
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        checkpoint.read(saved)
    assert str(saved) in str(info.value)


def test_other_task_is_refused(saved):
    with pytest.raises(CheckpointError, match="task 'lane_segmentation', not 'optical_flow'"):
        checkpoint.load_model(saved, task='optical_flow')
    model, _ = checkpoint.load_model(saved, task='lane_segmentation')
    assert model is not None


def test_missing_sidecar_is_refused(saved):
    saved.with_suffix('.json').unlink()
    with pytest.raises(CheckpointError, match='lane.json is missing') as info:
        checkpoint.load_model(saved)
    assert str(saved) in str(info.value)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        checkpoint.load_model(tmp_path / 'nothing.safetensors')


def test_unreadable_sidecar_is_refused(saved):
    saved.with_suffix('.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='unreadable checkpoint metadata') as info:
        checkpoint.load_model(saved)
    assert 'lane.json' in str(info.value)


def edit_sidecar(path, edit):
    side = path.with_suffix('.json')
    info = json.loads(side.read_text())
    edit(info)
    side.write_text(json.dumps(info))


def test_weights_of_another_architecture_are_refused(saved):
    # Transposed up-sampling adds weights the checkpoint does not have (missing keys).
    edit_sidecar(saved, lambda info: info['architecture']['config'].update(up='transposed'))
    with pytest.raises(CheckpointError, match='do not match the unet architecture') as info:
        checkpoint.load_model(saved)
    assert str(saved) in str(info.value) and 'transposed' in str(info.value)


def test_weights_of_another_size_are_refused_naming_the_file(saved):
    edit_sidecar(saved, lambda info: info['architecture']['config'].update(base=8))
    with pytest.raises(CheckpointError, match='do not match') as info:
        checkpoint.load_model(saved)
    assert str(saved) in str(info.value)


def test_unknown_architecture_is_refused(saved):
    edit_sidecar(saved, lambda info: info['architecture'].update(type='resnet'))
    with pytest.raises(CheckpointError, match="unknown architecture type 'resnet'"):
        checkpoint.load_model(saved)
    edit_sidecar(saved, lambda info: info.pop('architecture'))
    with pytest.raises(CheckpointError, match='no architecture entry'):
        checkpoint.load_model(saved)


def test_float_weights_do_not_load_into_a_quantized_architecture(saved):
    quant = copy.deepcopy(lane_meta(8)['architecture']['quant'])
    edit_sidecar(saved, lambda info: info['architecture'].update(quant=quant))
    with pytest.raises(CheckpointError, match='do not match'):
        checkpoint.load_model(saved)


def test_save_needs_an_architecture(tmp_path):
    model = checkpoint.build_model(lane_meta()['architecture'])
    meta = {k: v for k, v in lane_meta().items() if k != 'architecture'}
    with pytest.raises(CheckpointError, match='architecture'):
        checkpoint.save(tmp_path / 'x.safetensors', model, meta)
    assert not list(tmp_path.iterdir())
