"""
The shared training loop: DistributedDataParallel on CPU (gloo), resuming, refusals, workers.

Two gloo ranks must end with identical weights, equal (within float tolerance) to one process
training on the same global batch with the same seed. That holds for BatchNorm only when the
statistics are those of the global batch: a per-rank BatchNorm normalises each half-batch with
its own mean and variance, which is a different function. The runs therefore use a U-Net
without BatchNorm, and one with BatchNorm and ``sync_bn`` (statistics pooled over the ranks).
Everything runs on the 4-frame cache and the tiny models of test_training.py.
"""

import dataclasses
import json
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys

from helpers import FLOW, quiet, TINY, tiny_cache
from lane_seg.models import checkpoint
from lane_seg.models.checkpoint import CheckpointError
from lane_seg.train import flow, loop, resume, seg
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch

NO_BN = dict(TINY, batchnorm=False)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    cache = tiny_cache(tmp_path_factory.mktemp('dist') / 'c')
    return f'cache:{cache}'


def seg_cfg(data, out, **kw):
    args = {'data': data, 'val': data, 'out': str(out), 'arch': dict(NO_BN),
            'input_size': (64, 128), 'crop': (32, 64), 'epochs': 2, 'batch': 2, 'threads': 1,
            'max_train': 4, 'max_val': 1, 'calib_batches': 2}
    args.update(kw)
    return seg.SegTrainConfig(**args)


def weights(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith('model.')}


def assert_close(a, b, exact=False, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol,
                                       msg=f'{key}: max |diff| {diff:.3g}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, jobs, out):
    """One spawned rank: join the gloo group, run every job, dump this rank's weights."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = loop.setup('cpu')   # one gloo group for all jobs: fit() then neither joins nor ends it
    try:
        for name, (task, kwargs) in jobs.items():
            module = {'seg': seg, 'flow': flow}[task]
            config = seg.SegTrainConfig if task == 'seg' else flow.FlowTrainConfig
            result = loop.fit(module.TASK, config(**kwargs), log=quiet)
            assert result['world_size'] == world and result['rank'] == rank
            state = {f'model.{k}': v.detach().contiguous()
                     for k, v in result['model'].state_dict().items()}
            save_file(state, str(Path(out) / f'{name}-rank{rank}.safetensors'))
    finally:
        env.close()


@pytest.fixture(scope='module')
def float_run(data, tmp_path_factory):
    root = tmp_path_factory.mktemp('float')
    return seg.train(seg_cfg(data, root / 'lane'), log=quiet)


def flow_cfg(data, out, **kw):
    args = {'data': data, 'val': data, 'out': str(out), 'arch': dict(FLOW, batchnorm=False),
            'input_size': (64, 128), 'crop': (32, 64), 'epochs': 1, 'batch': 2, 'threads': 1,
            'max_train': 4, 'max_val': 1}
    args.update(kw)
    return flow.FlowTrainConfig(**args)


def test_two_gloo_ranks_match_one_process(data, float_run, tmp_path):
    # Float without BatchNorm, BatchNorm with sync_bn, QAT from the float model (calibration
    # shared out over the ranks, observers all-reduced, LSQ scales learned), and flow.
    jobs = {'float': seg_cfg(data, tmp_path / 'd_float'),
            'syncbn': seg_cfg(data, tmp_path / 'd_syncbn', arch=dict(TINY), sync_bn=True),
            'qat': seg_cfg(data, tmp_path / 'd_qat', init=float_run['checkpoint'],
                           quant_bits=8, epochs=1),
            'flow': flow_cfg(data, tmp_path / 'd_flow')}
    tasks = {name: 'flow' if name == 'flow' else 'seg' for name in jobs}
    torch.multiprocessing.spawn(
        _rank_main, nprocs=2, join=True,
        args=(2, free_port(), {k: (tasks[k], vars(v)) for k, v in jobs.items()}, tmp_path))
    singles = {'float': float_run['checkpoint']}
    for name in ('syncbn', 'qat', 'flow'):
        cfg = jobs[name]
        cfg.out = str(tmp_path / f'single_{name}')
        singles[name] = {'seg': seg, 'flow': flow}[tasks[name]].train(cfg, log=quiet)[
            'checkpoint']
    for name, single in singles.items():
        rank0 = weights(tmp_path / f'{name}-rank0.safetensors')
        rank1 = weights(tmp_path / f'{name}-rank1.safetensors')
        assert_close(rank0, rank1, exact=True)            # the ranks agree bit for bit
        assert_close(rank0, weights(single))              # and match one process
        saved = weights(tmp_path / f'd_{name}' / f'd_{name}.safetensors')
        assert_close(saved, rank0, exact=True)            # rank 0 wrote its weights
        info = json.loads((tmp_path / f'd_{name}' / f'd_{name}.json').read_text())
        assert info['training']['distributed'] == {'world_size': 2, 'backend': 'gloo',
                                                   'global_batch': 2}
    qat = weights(tmp_path / 'qat-rank0.safetensors')
    assert any(k.endswith('running_max') for k in qat)


def test_torchrun_runs_the_cli_unchanged(data, float_run, tmp_path):
    out = tmp_path / 'lane'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
           '2', '-m', 'lane_seg.cli', 'train', 'seg', '--data', data, '--val', data,
           '--out', str(out), '--levels', '1', '--base', '4', '--epochs', '1', '--batch', '2',
           '--max-train', '4', '--max-val', '1', '--threads', '1', '--crop', '32', '64']
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=str(Path(seg.__file__).resolve().parents[2]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    # Rank 0 alone logs and prints the result.
    assert proc.stdout.count('"checkpoint"') == 1 and proc.stdout.count('epoch 1:') == 1
    info = json.loads((out / 'lane.json').read_text())
    assert info['training']['distributed']['world_size'] == 2
    assert info['inputs'][0]['shape'] == [1, 3, 256, 512]
    assert (out / 'last.safetensors').exists()


def test_step_plan_shares_every_global_batch_evenly():
    one = loop.step_plan(7, 4, seed=3, epoch=2)
    assert [len(keys) for keys in one] == [4, 3]
    assert sorted(k[2] for keys in one for k in keys) == list(range(7))
    for world in (2, 3):
        ranks = [loop.step_plan(7, 4, 3, 2, world, r) for r in range(world)]
        for step in range(2):
            merged = sorted(k for r in ranks for k in r[step] if k[3])
            assert merged == sorted(one[step])
            sizes = [sum(k[3] for k in r[step]) for r in ranks]
            assert max(sizes) - min(sizes) <= 1
    # Rank 2 of 3 gets no sample of a 1-sample last batch: a zero-weight stand-in.
    short = loop.step_plan(5, 4, 3, 1, world=3, rank=2)
    assert [k[3] for k in short[1]] == [False]
    assert loop.step_plan(7, 4, 3, 2, first_step=1) == one[1:]
    assert not np.array_equal(loop.epoch_order(50, 3, 1), loop.epoch_order(50, 3, 2))


def test_killed_run_resumes_to_the_same_weights(data, float_run, tmp_path):
    # QAT, so the quantizer state has to survive the resume as well.
    common = {'init': float_run['checkpoint'], 'quant_bits': 8}
    full = seg.train(seg_cfg(data, tmp_path / 'full', **common), log=quiet)
    run = tmp_path / 'killed'
    stopped = seg.train(seg_cfg(data, run, stop_after=3, **common), log=quiet)
    # 2 steps an epoch: step 3 is in the middle of epoch 2.
    assert stopped['stopped_at_step'] == 3
    assert stopped['checkpoint'] == str(run / 'last.safetensors')
    assert not (run / 'killed.safetensors').exists()
    info = json.loads((run / 'last.json').read_text())
    assert (info['epoch'], info['step'], info['resume']['epoch_step']) == (2, 3, 1)
    assert {'python', 'numpy', 'torch'} <= set(info['resume']['rng'])
    assert info['resume']['quantizers'] and 'scheduler' in info['resume']
    resumed = seg.train(seg_cfg(data, run, resume='auto', **common), log=quiet)
    assert_close(weights(resumed['checkpoint']), weights(full['checkpoint']), exact=True)
    timing = ('seconds', 'samples_per_s')
    assert ({k: v for k, v in resumed['metrics'].items() if k not in timing}
            == {k: v for k, v in full['metrics'].items() if k not in timing})
    info = json.loads((run / 'killed.json').read_text())
    assert info['training']['resumed'] == [{'step': 3, 'world_size': 1}]
    assert [h['epoch'] for h in info['metrics']['history']] == [0, 1, 2]


def test_checkpoint_every_and_workers_give_the_same_run(data, float_run, tmp_path):
    run = seg.train(seg_cfg(data, tmp_path / 'w', workers=2, checkpoint_every=1), log=quiet)
    assert_close(weights(run['checkpoint']), weights(float_run['checkpoint']), exact=True)
    last = json.loads((tmp_path / 'w' / 'last.json').read_text())
    prev = json.loads((tmp_path / 'w' / 'prev.json').read_text())
    assert (last['step'], prev['step']) == (4, 3)


@pytest.fixture(scope='module')
def training_checkpoints(data, tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    seg.train(seg_cfg(data, root / 'seg', epochs=1, checkpoint_every=1), log=quiet)
    flow.train(flow.FlowTrainConfig(
        data=data, val=data, out=str(root / 'flow'), arch=dict(FLOW), input_size=(64, 128),
        crop=(32, 64), epochs=1, batch=2, threads=1, max_train=2, max_val=1), log=quiet)
    return root


def copy_run(training_checkpoints, tmp_path, source):
    run = tmp_path / 'run'
    run.mkdir()
    for path in (training_checkpoints / source).iterdir():
        shutil.copy(path, run / path.name)
    return run


@pytest.mark.parametrize('keep', [0.5, 0.0])
def test_truncated_checkpoint_is_refused(data, training_checkpoints, tmp_path, keep):
    run = copy_run(training_checkpoints, tmp_path, 'seg')
    last = run / 'last.safetensors'
    last.write_bytes(last.read_bytes()[:int(last.stat().st_size * keep)])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        seg.train(seg_cfg(data, run, epochs=1, resume=str(last)), log=quiet)
    assert str(last) in str(info.value)


def test_flow_checkpoint_is_refused_by_seg_training(data, training_checkpoints, tmp_path):
    path = training_checkpoints / 'flow' / 'last.safetensors'
    with pytest.raises(CheckpointError, match="task 'optical_flow', not 'lane_segmentation'"):
        seg.train(seg_cfg(data, tmp_path / 'x', epochs=1, resume=str(path)), log=quiet)


@pytest.mark.parametrize('change, message', [
    ({'arch': dict(NO_BN, base=8)}, 'architecture does not match this run: config.base: '
                                    'checkpoint 4, this run 8'),
    ({'batch': 4}, 'other settings: batch: checkpoint 2, this run 4'),
    ({'max_train': 3}, 'training samples: checkpoint 4, this run 3'),
])
def test_mismatched_checkpoint_is_refused(data, training_checkpoints, tmp_path, change,
                                          message):
    path = training_checkpoints / 'seg' / 'last.safetensors'
    cfg = seg_cfg(data, tmp_path / 'x', epochs=1, resume=str(path), **change)
    with pytest.raises(CheckpointError, match=message):
        seg.train(cfg, log=quiet)


def test_model_checkpoint_is_not_resumable(data, training_checkpoints, tmp_path):
    path = training_checkpoints / 'seg' / 'seg.safetensors'
    with pytest.raises(CheckpointError, match='not a resumable training checkpoint'):
        seg.train(seg_cfg(data, tmp_path / 'x', epochs=1, resume=str(path)), log=quiet)


def test_torn_save_falls_back_to_the_previous_checkpoint(data, training_checkpoints,
                                                         tmp_path):
    run = copy_run(training_checkpoints, tmp_path, 'seg')
    # Killed between the two renames: new tensors, old JSON.
    shutil.copy(run / 'prev.json', run / 'last.json')
    assert resume.locate('auto', run) == run / 'prev.safetensors'
    cfg = seg_cfg(data, run, epochs=1, resume=str(run / 'last.safetensors'))
    with pytest.raises(CheckpointError, match='sha256 differs'):
        seg.train(cfg, log=quiet)
    (run / 'prev.safetensors').write_bytes(b'\0' * 10)
    with pytest.raises(CheckpointError, match='no usable checkpoint'):
        resume.locate('auto', run)
    assert resume.locate('auto', tmp_path / 'empty') is None


def test_sigterm_stops_at_a_step_boundary_with_state_saved(data, tmp_path):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip('SIGTERM is handled by the test runner')
    steps = []

    def loss(cfg, logits, y):
        steps.append(1)
        if len(steps) == 3 and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            signal.raise_signal(signal.SIGTERM)
        return seg.seg_loss_terms(logits, y)

    task = dataclasses.replace(seg.TASK, loss=loss)
    result = loop.fit(task, seg_cfg(data, tmp_path / 'term'), log=quiet)
    assert result['stopped_at_step'] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    tensors, info = checkpoint.read(tmp_path / 'term' / 'last.safetensors')
    assert info['step'] == 3


class CountingHook:
    """Hook that counts steps, checks the batch loss, and keeps its count across a resume."""

    name = 'counter'

    def __init__(self):
        self.steps, self.pairs, self.restored, self.ready = 0, [], None, False

    def setup(self, model, meta, env):
        self.ready = env.world_size == 1 and model is not None

    def after_backward(self, ctx):
        self.steps += 1
        self.pairs.append((ctx.loss, ctx.batch_loss()))

    def state(self):
        return {'steps': self.steps}

    def load_state(self, state):
        self.restored = state
        self.steps = state['steps']

    def finish(self, model, meta):
        meta['counter'] = self.steps


def test_hooks_see_every_step_and_survive_a_resume(data, tmp_path):
    first, second = CountingHook(), CountingHook()
    cfg = seg_cfg(data, tmp_path / 'h', stop_after=3)
    assert loop.fit(seg.TASK, cfg, log=quiet, hooks=[first])['stopped_at_step'] == 3
    assert first.ready and first.steps == 3
    for loss, again in first.pairs:   # before the optimiser step: the same model and batch
        assert again == pytest.approx(loss, rel=1e-6)
    cfg = seg_cfg(data, tmp_path / 'h', resume='auto')
    result = loop.fit(seg.TASK, cfg, log=quiet, hooks=[second])
    assert second.restored == {'steps': 3} and second.steps == 4
    assert json.loads(Path(result['checkpoint']).with_suffix('.json').read_text())[
        'counter'] == 4
