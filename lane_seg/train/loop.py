"""
One training loop for both networks: a single process, or DistributedDataParallel under torchrun.

``fit(task, cfg)`` runs a ``TrainTask`` (what differs between the networks: metadata, data set,
one augmented sample, loss, evaluation) with AdamW and a one-cycle schedule, evaluates after
every epoch and writes the model checkpoint ``RUN/NAME.safetensors`` at the end.

Distributed runs: launched by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) the loop
joins the process group (nccl on CUDA, gloo on CPU), wraps the model in DistributedDataParallel
and gives every rank its share of each global batch (``cfg.batch`` and ``cfg.lr`` are per global
batch, as in a single process). Each rank's loss is scaled so that the averaged gradient is
exactly the gradient of the global batch's loss, even when the last batch does not split evenly.
Rank 0 alone evaluates, logs, shows progress bars and writes checkpoints. ``cfg.sync_bn`` pools
BatchNorm statistics over the ranks. Quantizers stay identical on every rank: calibration
batches are shared out and the observers all-reduced (max of the ranges, sum of the moments)
before the scales are set; learned scales and bit widths are parameters, so DDP averages their
gradients; DDP broadcasts rank 0's buffers.

Determinism: epoch ``e`` visits the samples in a permutation drawn from ``(seed, e)``, and the
sample at position ``p`` is augmented with a generator seeded from ``(seed, e, p)``. Every world
size therefore trains on the same samples, and a resumed run skips the steps already done and
continues bit for bit (``resume`` writes ``RUN/last.safetensors`` every epoch, every
``cfg.checkpoint_every`` steps, at ``cfg.stop_after`` and on SIGTERM).
"""

from dataclasses import asdict, dataclass
import datetime
import gc
import itertools
import json
import math
import os
from pathlib import Path
import random
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np

from . import resume

_ORDER, _SAMPLE = 0x0DE5, 0x5A3E   # domain tags of the two kinds of generators


@dataclass(frozen=True)
class TrainTask:
    """What differs between the networks; everything else is the loop's."""

    name: str                 # CLI verb: 'seg' or 'flow'
    task: str                 # metadata task: 'lane_segmentation' or 'optical_flow'
    metadata: Callable        # (cfg, name) -> model metadata
    samples: Callable         # data spec -> indexable data set
    item: Callable            # (samples, i, meta, cfg, rng) -> arrays, the model input first
    calibration: Callable     # (samples, meta, cfg, rng) -> iterator of input batches
    loss: Callable            # (cfg, prediction, *targets) -> (total, weight): total / weight
    evaluate: Callable        # (model, samples, meta, cfg) -> metrics dict


@dataclass
class DistEnv:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = 'cpu'
    backend: str = ''
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor, op: str = 'sum'):
        """Sum (or max) ``tensor`` over the ranks in place; a no-op in a single process."""
        if self.distributed:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == 'max' else dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj):
        """Return rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owns_group = False


def pick_device(spec: str = 'auto', local_rank: int = 0) -> str:
    """Resolve ``--device``: auto (this rank's GPU if there is one, else the CPU), cpu, cuda."""
    import torch
    if spec == 'auto':
        return f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    if spec == 'cpu':
        return spec
    if spec.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError(f'--device {spec}: no CUDA device is available')
        return spec if ':' in spec else f'cuda:{local_rank}'
    raise ValueError(f'--device {spec!r} is not auto, cpu or cuda[:N]')


def setup(device: str = 'auto', timeout_minutes: float = 60) -> DistEnv:
    """Join the torchrun job described by the environment, or return a single-process env."""
    import torch
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    dev = pick_device(device, local)
    if dev.startswith('cuda'):
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(device=dev)
    import torch.distributed as dist
    owns = not dist.is_initialized()
    if owns:
        # DDP imports torch._dynamo, and that import keeps references to a process group that
        # already exists: the group would outlive destroy_process_group and its gloo threads
        # abort the interpreter at exit. Imported first, it holds none.
        import torch._dynamo  # noqa: F401
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo',
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend(), owns)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Return the sample order of ``epoch``: the same on every rank and in every resumed run."""
    return np.random.default_rng([_ORDER, seed % 2 ** 63, epoch]).permutation(n)


def sample_rng(seed: int, epoch: int, position: int):
    """Return the augmentation generator of the sample at ``position`` of ``epoch``."""
    return np.random.default_rng([_SAMPLE, seed % 2 ** 63, epoch, position])


def shard(count: int, world: int, rank: int):
    """Return [start, stop) of ``rank``'s share of ``count`` items (sizes differ by 1 at most)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def step_plan(n, batch, seed, epoch, world=1, rank=0, first_step=0) -> list:
    """
    Return this rank's sample keys for every global step of ``epoch`` from ``first_step`` on.

    A key is (epoch, position in the epoch, sample index, real). A rank left without a sample
    by a short last batch gets the batch's first sample with ``real`` False (zero weight).
    """
    order = epoch_order(n, seed, epoch)
    plan = []
    for step in range(first_step, math.ceil(n / batch)):
        lo = step * batch
        a, b = shard(min(batch, n - lo), world, rank)
        keys = [(epoch, p, int(order[p]), True) for p in range(lo + a, lo + b)]
        plan.append(keys or [(epoch, lo, int(order[lo]), False)])
    return plan


class TrainItems:
    """Index data set over ``step_plan`` keys: calls the task's per-sample pre-processing."""

    def __init__(self, task: TrainTask, samples, meta: dict, cfg):
        self.task, self.samples, self.meta, self.cfg = task, samples, meta, cfg

    def __getitem__(self, key):
        epoch, position, index, real = key
        rng = sample_rng(self.cfg.seed, epoch, position)
        return (*self.task.item(self.samples, index, self.meta, self.cfg, rng), real)


def collate(items):
    """Stack samples into tensors; returns (tensors, number of real samples)."""
    import torch
    fields = list(zip(*items))
    return [torch.from_numpy(np.stack(f)) for f in fields[:-1]], sum(map(bool, fields[-1]))


def _worker_init(_worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def make_loader(items: TrainItems, plan: list, workers: int = 0, pin: bool = False):
    """Return a DataLoader over ``plan`` (``workers`` > 0: that many worker processes)."""
    from torch.utils.data import DataLoader
    return DataLoader(items, batch_sampler=plan, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, worker_init_fn=_worker_init if workers else None)


def calibrate_synced(model, batches, limit: int, env: DistEnv, example) -> int:
    """
    Calibrate activation quantizers on the first ``limit`` batches, shared out over the ranks.

    Each rank observes its batches; the ranges (max) and moments (sum) are all-reduced before
    the scales are set, so every rank gets the scales a single process would compute. Ranges
    calibrated from a sample of the activations (``act_clip='mse'``) are averaged over the
    ranks afterwards, so all ranks share them.
    """
    import torch
    from ..models.quant import act_quantizers, calibrate
    mine = (x.to(env.device) for i, x in enumerate(itertools.islice(batches, limit))
            if i % env.world_size == env.rank)

    def pool(quants):
        for q in quants:
            env.all_reduce(q.running_max, 'max')
            env.all_reduce(q.moments)
    n = calibrate(model, mine, reduce=pool, example=example)
    if env.world_size > 1:
        with torch.no_grad():
            for q in act_quantizers(model):
                if q.clip == 'mse':
                    env.all_reduce(q.scale.data)
                    q.scale.data /= env.world_size
    return n


class _StopOnSignal:
    """Turn the first SIGTERM (preemption, torchrun shutting down) into a flag; a second kills."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, _signum, _frame):
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __exit__(self, *_exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def add_run_arguments(p):
    """Add the flags of the loop itself (distributed runs, resuming, data loading) to ``p``."""
    p.add_argument('--resume', default='', metavar='PATH|auto',
                   help="continue a run: a last.safetensors checkpoint, a run folder, or 'auto' "
                   '(the latest in --out; starts afresh when there is none)')
    p.add_argument('--checkpoint-every', type=int, default=0, metavar='N',
                   help='also write RUN/last.safetensors every N steps (always: every epoch)')
    p.add_argument('--stop-after', type=int, default=0, metavar='STEP',
                   help='stop after this global step, state saved (resume later)')
    p.add_argument('--workers', type=int, default=0,
                   help='data-loading worker processes per rank (default 0: in-process)')
    p.add_argument('--sync-bn', action='store_true',
                   help='pool BatchNorm statistics over all ranks (torchrun runs)')
    p.add_argument('--device', default='auto', help='auto (GPU of this rank if any), cpu, cuda')


def run_arguments(args) -> dict:
    """Return the config fields set by ``add_run_arguments``."""
    return {'resume': args.resume, 'checkpoint_every': args.checkpoint_every,
            'stop_after': args.stop_after, 'workers': args.workers, 'sync_bn': args.sync_bn,
            'device': args.device}


def _quiet(_message):
    pass


@dataclass
class StepContext:
    """What a hook's ``after_backward`` sees of one training step."""

    model: object             # the model itself (not the DDP wrapper)
    inputs: list              # this rank's share of the batch (tensors on the device)
    loss: float               # task loss of the global batch
    batch_loss: Callable      # () -> task loss of the global batch with the model as it is now
    env: DistEnv
    step: int                 # global step, counting from 1


def run_task(task: TrainTask, cfg, log=print) -> dict:
    """
    Run ``fit`` with the hooks ``cfg`` asks for (``learn_bits``: the learned-width hook).

    Returns the checkpoint path and the final metrics (on every rank), and 'stopped_at_step'
    when the run stopped early with its state in ``RUN/last.safetensors``.
    """
    hooks = []
    if cfg.learn_bits:
        from .bits_hook import LearnBitsHook
        hooks.append(LearnBitsHook(cfg))
    result = fit(task, cfg, log, hooks=hooks)
    return {k: result[k] for k in ('checkpoint', 'metrics', 'stopped_at_step') if k in result}


def fit(task: TrainTask, cfg, log=print, hooks=()) -> dict:
    """
    Run one training job (single process, or one rank of a torchrun job).

    Returns {'checkpoint', 'metrics', 'model', 'step', 'rank', 'world_size'} on every rank, plus
    'stopped_at_step' when the run stopped early (``cfg.stop_after`` or SIGTERM): its
    'checkpoint' is then ``RUN/last.safetensors``, to resume from.

    ``hooks`` extend the loop (learned bit widths, for example); every method is optional:
    ``setup(model, meta, env)`` once the model is built (quantized, calibrated or resumed),
    ``after_backward(StepContext)`` before each optimiser step (``batch_loss()`` is a
    collective: every rank must call it equally often), ``state() -> dict`` (JSON) and
    ``load_state(dict)`` for resumable checkpoints (keyed by ``hook.name``), and
    ``finish(model, meta)`` before the model checkpoint is written.
    """
    env = setup(cfg.device)
    run = _Run(task, cfg, env, log if env.is_main else _quiet, hooks)
    try:
        return run.run()
    finally:
        # The DDP reducer holds the process group: drop it before destroying the group.
        run.net = run.opt = run.sched = None
        gc.collect()
        env.close()


class _Run:

    def __init__(self, task: TrainTask, cfg, env: DistEnv, log, hooks=()):
        self.task, self.cfg, self.env, self.log = task, cfg, env, log
        self.hooks = list(hooks)
        self.step = 0
        self.loss_sum = self.loss_count = 0.0
        self.history, self.metrics = [], {}
        self.net = self.opt = self.sched = None

    def run(self) -> dict:
        import torch
        cfg, env = self.cfg, self.env
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = json.loads(json.dumps(asdict(cfg)))
        self.train_set, self.val_set = self.task.samples(cfg.data), self.task.samples(cfg.val)
        self.n_train = min(cfg.max_train or len(self.train_set), len(self.train_set))
        self.steps_per_epoch = math.ceil(self.n_train / cfg.batch)
        if cfg.epochs > 0 and not self.n_train:
            raise ValueError(f'{cfg.data}: no training samples')
        if cfg.batch < env.world_size:
            raise ValueError(f'--batch {cfg.batch} is the global batch: it needs at least one '
                             f'sample for each of the {env.world_size} processes')
        saved = self._build_model()
        self.meta['training']['config'] = self.config
        self._call('setup', self.model, self.meta, env)
        stopped = False
        if cfg.epochs > 0:
            self._build_optimizer(saved)
            stopped = self._train()
        return self._finish(stopped)

    def _build_model(self):
        """Build, fine-tune-initialise or resume the model; returns the resumed state or None."""
        import torch
        from ..models import checkpoint
        from .seg import inherit_metadata
        cfg, env, task = self.cfg, self.env, self.task
        self.meta = task.metadata(cfg, self.out.name)
        path = resume.locate(cfg.resume, self.out) if cfg.resume else None
        if cfg.resume and path is None:
            self.log(f'--resume {cfg.resume}: no checkpoint in {self.out}, starting afresh')
        if path is not None:
            expected = self.meta
            if cfg.init:
                expected = inherit_metadata(self.meta, checkpoint.read(cfg.init)[1])
            model, tensors, info = resume.load_state(path, task.task, expected['architecture'],
                                                     self.config, self.n_train)
            saved = dict(info['resume'], tensors=tensors, info=info)
            self.meta = {k: v for k, v in info.items()
                         if k not in ('kind', 'optimizer', 'resume', 'epoch', 'step',
                                      'tensors_sha256')}
            self.meta['training'].setdefault('resumed', []).append(
                {'step': saved['step'], 'world_size': env.world_size})
            self.history, self.metrics = saved['history'], saved['metrics']
            self.step = saved['step']
            self.loss_sum, self.loss_count = saved['loss_sum'], saved['loss_count']
            self.log(f'resuming from {path}: epoch {saved["epoch"]}, step {saved["step"]}')
            self.model = model.to(env.device)
            return saved
        if cfg.init:
            model, init_meta = checkpoint.load_model(cfg.init, task=task.task)
            self.meta = inherit_metadata(self.meta, init_meta)
            quantize = cfg.quant_bits and not init_meta['architecture'].get('quant')
            if cfg.layer_bits and not quantize:
                raise ValueError(f'--layer-bits needs a float --init ({cfg.init} is already '
                                 'quantized)' if cfg.quant_bits else
                                 '--layer-bits needs --quant-bits (the width of the layers '
                                 'the file does not name)')
            if cfg.layer_bits and cfg.learn_bits:
                raise ValueError('--layer-bits fixes the widths, --learn-bits learns them: '
                                 'use one of the two')
            if quantize:
                from ..models.quant import QuantConfig, quantize_model
                quantize_model(model, QuantConfig(**self.meta['architecture']['quant']))
                if cfg.layer_bits:   # before calibration: ranges are found at these widths
                    from ..models.bitwidth import apply_layer_bits, read_layer_bits
                    widths = apply_layer_bits(model, read_layer_bits(cfg.layer_bits))
            self.model = model.to(env.device)
            if quantize:
                example = torch.zeros(1, *self.meta['inputs'][0]['shape'][1:],
                                      device=env.device)
                calibrate_synced(self.model, task.calibration(self.train_set, self.meta, cfg,
                                                              self.rng),
                                 cfg.calib_batches, env, example)
                if cfg.layer_bits:
                    self._record_layer_bits(widths)
            if env.is_main:
                self.metrics = task.evaluate(self.model, self.val_set, self.meta, cfg)
                self.log(f'start: {self.metrics}')
                self.history.append({'epoch': 0, **self.metrics})
        else:
            if cfg.layer_bits:
                raise ValueError('--layer-bits needs --init: the float model to quantize at '
                                 'those widths')
            self.model = checkpoint.build_model(self.meta['architecture']).to(env.device)
        return None

    def _record_layer_bits(self, widths: dict):
        """Write fixed per-layer widths and their hardware cost into the run's metadata."""
        from ..models.bitwidth import hardware_cost
        quant = dict(self.meta['quantization'])
        quant.update(scheme='fixed-layer-bits', layer_bits=widths,
                     layer_bits_from=str(self.cfg.layer_bits))
        quant.update(hardware_cost(self.model, [1] + list(self.meta['inputs'][0]['shape'][1:])))
        self.meta['quantization'] = quant
        self.log(f'fixed layer widths from {self.cfg.layer_bits}: '
                 f'{quant["model_size_bits"] / 8192:.0f} KiB of weights')

    def _build_optimizer(self, saved):
        import torch
        from ..models import checkpoint
        cfg, env = self.cfg, self.env
        if cfg.sync_bn and env.distributed:
            from .syncbn import convert_sync_batchnorm
            self.model = convert_sync_batchnorm(self.model, env.device)
        self.net = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel
            cuda = env.device.startswith('cuda')
            self.net = DistributedDataParallel(
                self.model, device_ids=[torch.device(env.device).index] if cuda else None,
                find_unused_parameters=bool(self.meta['architecture'].get('quant')))
        from ..models.quant import act_quantizers
        self.act_quants = act_quantizers(self.model) if env.distributed else []
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = max(cfg.epochs * self.steps_per_epoch, 1)
        pct = 0.15 if not cfg.init else 0.05
        if abs(pct * total - 1.0) < 1e-9 or pct * total >= total - 1:
            # OneCycleLR divides by the warm-up length (pct * total - 1): a warm-up of exactly
            # one step is a division by zero (e.g. 20 steps at 5 %), so take two.
            pct = min(2.0 / total, 0.5)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
        if saved is not None:
            checkpoint.restore_optimizer(self.opt, saved['tensors'], saved['info'])
            self.sched.load_state_dict(saved['scheduler'])
            resume.restore_rng(saved['rng'], self.rng)
            for hook in self.hooks:
                if hasattr(hook, 'load_state'):
                    hook.load_state(saved.get('hooks', {}).get(hook.name, {}))

    def _train(self) -> bool:
        """Train the remaining steps; returns True when stopped early (state saved)."""
        from tqdm import tqdm
        cfg, env = self.cfg, self.env
        spe = self.steps_per_epoch
        items = TrainItems(self.task, self.train_set, self.meta, cfg)
        with _StopOnSignal() as signalled:
            for epoch in range(self.step // spe + 1, cfg.epochs + 1):
                first = self.step - (epoch - 1) * spe
                if first == 0:
                    self.loss_sum = self.loss_count = 0.0
                self.net.train()
                plan = step_plan(self.n_train, cfg.batch, cfg.seed, epoch, env.world_size,
                                 env.rank, first)
                batches = make_loader(items, plan, cfg.workers,
                                      pin=env.device.startswith('cuda'))
                bar = tqdm(batches, total=spe, initial=first, desc=f'epoch {epoch}/{cfg.epochs}',
                           unit='batch', leave=False,
                           disable=not (env.is_main and sys.stderr.isatty()))
                t0, seen, stop = time.perf_counter(), 0.0, False
                for tensors, real in bar:
                    stop = self._step(tensors, real, signalled)
                    seen += self._last_count
                    mid_epoch = self.step % spe != 0
                    if mid_epoch and (stop or (cfg.stop_after and self.step >= cfg.stop_after)):
                        self._save(epoch)
                        self.log(f'stopped at step {self.step} (epoch {epoch}); state in '
                                 f'{self.out / "last.safetensors"}')
                        return True
                    if mid_epoch and cfg.checkpoint_every and \
                            self.step % cfg.checkpoint_every == 0:
                        self._save(epoch)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                metrics = (self.task.evaluate(self.model, self.val_set, self.meta, cfg)
                           if env.is_main else {})
                metrics['loss'] = round(self.loss_sum / max(self.loss_count, 1), 4)
                metrics['samples_per_s'] = round(rate, 2)
                self.metrics = metrics
                self.history.append({'epoch': epoch, **metrics})
                self.log(f'epoch {epoch}: {metrics}')
                self.loss_sum = self.loss_count = 0.0
                self._save(epoch)
                if epoch < cfg.epochs and (stop or (cfg.stop_after
                                                    and self.step >= cfg.stop_after)):
                    self.log(f'stopped after epoch {epoch}, step {self.step}')
                    return True
        return False

    def _step(self, tensors, real: int, signalled: _StopOnSignal) -> bool:
        """Run one optimiser step on this rank's share; returns whether any rank must stop."""
        import torch
        env = self.env
        tensors = [t.to(env.device, non_blocking=True) for t in tensors]
        first = self.step % self.steps_per_epoch * self.cfg.batch
        share = tensors[0].shape[0] / min(self.cfg.batch, self.n_train - first)
        for q in self.act_quants:   # LSQ gradient scale of the global batch
            q.batch_share = share
        total, weight = self.task.loss(self.cfg, self.net(tensors[0]), *tensors[1:])
        weight = torch.as_tensor(weight, device=total.device).detach().double().reshape(())
        if not real:
            total, weight = total * 0, weight * 0
        stats = torch.stack([weight, total.detach().double(),
                             weight.new_tensor(float(real)),
                             weight.new_tensor(float(signalled.requested))])
        g_weight, g_total, g_count, g_stop = env.all_reduce(stats).tolist()
        g_weight = max(g_weight, 1.0)
        # DDP averages gradients over ranks: scaling by world / global weight makes the result
        # the gradient of (sum of all totals) / (global weight), the global batch's loss.
        loss = total * (env.world_size / g_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.hooks:
            ctx = StepContext(self.model, tensors, g_total / g_weight,
                              lambda: self._batch_loss(tensors, real), env, self.step + 1)
            self._call('after_backward', ctx)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.loss_sum += g_total / g_weight * g_count
        self.loss_count += g_count
        self._last_count = g_count
        return g_stop > 0

    def _batch_loss(self, tensors, real: int) -> float:
        """Task loss of the global batch with the current model (no gradients; collective)."""
        import torch
        with torch.no_grad():
            total, weight = self.task.loss(self.cfg, self.model(tensors[0]), *tensors[1:])
            weight = torch.as_tensor(weight, device=total.device).double().reshape(())
            stats = torch.stack([total.double(), weight]) * (1.0 if real else 0.0)
            total, weight = self.env.all_reduce(stats).tolist()
        return total / max(weight, 1.0)

    def _call(self, method: str, *args):
        for hook in self.hooks:
            if hasattr(hook, method):
                getattr(hook, method)(*args)

    def _save(self, epoch: int):
        if not self.env.is_main:
            return
        self.meta['metrics'] = {'val': self.metrics, 'history': self.history}
        state = {'epoch': epoch, 'step': self.step,
                 'epoch_step': self.step - (epoch - 1) * self.steps_per_epoch,
                 'steps_per_epoch': self.steps_per_epoch, 'n_train': self.n_train,
                 'world_size': self.env.world_size, 'loss_sum': self.loss_sum,
                 'loss_count': self.loss_count, 'history': self.history,
                 'metrics': self.metrics, 'scheduler': self.sched.state_dict(),
                 'rng': resume.capture_rng(self.rng),
                 'quantizers': resume.quantizer_state(self.model),
                 'hooks': {h.name: h.state() for h in self.hooks if hasattr(h, 'state')}}
        resume.save_state(self.out, self.model, self.meta, self.opt, state)

    def _finish(self, stopped: bool) -> dict:
        from ..models import checkpoint
        env, out = self.env, self.out
        result = {'step': self.step, 'rank': env.rank, 'world_size': env.world_size,
                  'model': self.model}
        if stopped:
            path = out / f'{resume.LAST}.safetensors'
            result['stopped_at_step'] = self.step
        else:
            path = out / f'{out.name}.safetensors'
            self.meta['metrics'] = {'val': self.metrics, 'history': self.history}
            self.meta['training']['config'] = self.config
            self.meta['training']['distributed'] = {
                'world_size': env.world_size, 'backend': env.backend or None,
                'global_batch': self.cfg.batch}
            self._call('finish', self.model, self.meta)
            if env.is_main:
                checkpoint.save(path, self.model, self.meta)
        # Also a barrier: no rank returns before rank 0 has written its checkpoint.
        result['metrics'] = env.broadcast(self.metrics)
        result['checkpoint'] = str(path)
        return result
