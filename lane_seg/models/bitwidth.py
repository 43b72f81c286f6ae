"""
Learned bit widths: trainable per-layer (or uniform) bit widths with a hardware loss.

After the INRIA / CNES study of quantized networks for on-board satellite processing
(Gernigon, Filip, Sentieys, Coggiola): every bit width N is a trainable real number in
[2, 8], the forward pass quantizes with round(N) bits, and training minimises

    L_total = lam * L_task(N) + (1 - lam) * L_hard(N).

The task loss is a step function of N, so its derivative is replaced by a finite difference on
the current batch; the gradient of one bit-width group is

    dL_total/dN ~ lam * (L_task(N) - L_task(N - 1)) + (1 - lam) * dL_hard/dN

where L_task(N - 1) is the task loss of the same batch with that group one bit lower (one extra
forward pass per group; the uniform mode has two groups, all weights and all activations). At
the lower bound (2 bits) the backward difference would need 1 bit, whose symmetric grid is {0};
there the forward difference L_task(3) - L_task(2) estimates the same slope.

Two extensions the study lists as future work:

- mixed precision (``mode='per_layer'``): one N per QConv2d weight tensor and one per ActQuant;
- realistic hardware losses: model size in bits (sum of weights x weight bits) and bit
  operations (sum of MACs x weight bits x input-activation bits), each divided by its 8-bit
  value; the study's sum of bit widths stays available (``hardware='sum_bits'``).

When an activation quantizer changes width its clipping range is kept: the step is rescaled
so that step x qmax stays the same (weights keep theirs anyway: the per-channel step is
max|w| / qmax). ``export_learned`` writes the result as int8 QDQ ONNX with the true widths in
the metadata; ``footprint_table`` gives the per-layer weight and peak activation memory in the
form MCU deployment tables use.
"""

import contextlib
import copy
from dataclasses import dataclass
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .quant import (ActQuant, check_signed_symmetric, link_bias_quantizers, QConv2d, qrange,
                    quant_summary)

MIN_BITS = 2
MAX_BITS = 8
MODES = ('per_layer', 'uniform')
HARDWARE = ('sum_bits', 'size', 'bitops')
# Operand width of a conv input no quantizer covers (the image of a study-scheme network, a
# float accumulator): counted as 8 bits in bit operations.
UNQUANTIZED_OPERAND_BITS = 8
ACC_BITS = 32   # int32 accumulators / float outputs that no activation quantizer follows
BIAS_BITS = 32  # biases are int32 on the input-scale x weight-scale grid


def round_bits(value) -> int:
    """
    Round a learned bit width: half up (2.5 -> 3, not Python's 2), then clamp to 2..8.

    Python's ``round`` and ``torch.round`` round halves to even (2.5 -> 2, 3.5 -> 4); a learned
    width sitting on .5 would then go up or down with its parity. Half up is one rule for all.
    """
    return int(min(max(math.floor(float(value) + 0.5), MIN_BITS), MAX_BITS))


def _round_tensor(n: torch.Tensor) -> torch.Tensor:
    """Compute ``round_bits`` element-wise on a tensor."""
    return torch.floor(n + 0.5).clamp(MIN_BITS, MAX_BITS)


def set_bits(module, bits: int, keep_range: bool = True):
    """
    Set the bit width of a QConv2d or ActQuant.

    With ``keep_range`` a calibrated ActQuant's step is rescaled by qmax(old) / qmax(new), so
    its clipping range (step x qmax) stays: fewer bits mean a coarser grid over the same range,
    not a range cut 2x per bit. QConv2d steps follow the width by themselves (max|w| / qmax).
    Without ``keep_range`` (restoring saved widths whose steps were saved with them) only the
    width changes.
    """
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f'bits={bits} outside {MIN_BITS}..{MAX_BITS}')
    if isinstance(module, ActQuant) and keep_range and module.bits != bits \
            and bool(module.calibrated):
        with torch.no_grad():
            module.scale.mul_(module.qbounds(module.bits)[1] / module.qbounds(bits)[1])
    module.bits = bits


def restore_layer_bits(model: nn.Module, layer_bits: dict) -> nn.Module:
    """
    Put saved per-layer widths (metadata ``quantization.layer_bits``) back into a model.

    For a checkpoint rebuilt by ``checkpoint.load_model``: its state dict holds the steps
    learned at these widths, so the widths are set without rescaling.
    """
    modules = dict(model.named_modules())
    for kind, cls in (('weights', QConv2d), ('activations', ActQuant)):
        for name, bits in layer_bits.get(kind, {}).items():
            module = modules.get(name)
            if not isinstance(module, cls):
                raise ValueError(f'layer_bits: {kind} layer {name!r} is not a '
                                 f'{cls.__name__} of this model')
            set_bits(module, bits, keep_range=False)
    return model


def read_layer_bits(path) -> dict:
    """
    Read per-layer widths from a JSON file or a checkpoint's metadata.

    A JSON file holds ``{"weights": {layer: bits}, "activations": {layer: bits}}`` (either
    entry may be missing); a checkpoint (``.safetensors``, or its ``.json`` metadata) must carry
    them as ``quantization.layer_bits`` (a ``--learn-bits`` run, or one trained at fixed
    widths).
    """
    import json
    from pathlib import Path
    path = Path(path)
    source = path.with_suffix('.json') if path.suffix == '.safetensors' else path
    if not source.is_file():
        raise ValueError(f'layer bits: no file {source}')
    try:
        data = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f'layer bits: {source} is not readable JSON: {exc}') from exc
    widths = data
    if isinstance(data, dict) and ('quantization' in data or 'format' in data):
        widths = (data.get('quantization') or {}).get('layer_bits')
        if not widths:
            raise ValueError(f'layer bits: checkpoint {path} has no quantization.layer_bits '
                             'in its metadata (not a learned-width run)')
    if not isinstance(widths, dict) or not set(widths) <= {'weights', 'activations'} \
            or not all(isinstance(v, dict) for v in widths.values()):
        raise ValueError(f'layer bits: {path} must hold {{"weights": {{layer: bits}}, '
                         f'"activations": {{layer: bits}}}}')
    for kind, layers in widths.items():
        for name, bits in layers.items():
            if not isinstance(bits, int) or isinstance(bits, bool) \
                    or not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f'layer bits: {path}: {kind} {name!r} = {bits!r}, not an '
                                 f'integer in {MIN_BITS}..{MAX_BITS}')
    return {'weights': dict(widths.get('weights', {})),
            'activations': dict(widths.get('activations', {}))}


def apply_layer_bits(model: nn.Module, layer_bits: dict) -> dict:
    """
    Give a fake-quantized model fixed per-layer widths (QAT at widths found by a learned run).

    Every named layer must be a QConv2d (weights) or an ActQuant (activations) of the model;
    layers not named keep their width. Calibrated activation ranges are kept (``set_bits``), so
    this works before or after calibration. Returns the model's widths afterwards.
    """
    modules = dict(model.named_modules())
    for kind, cls in (('weights', QConv2d), ('activations', ActQuant)):
        unknown = [n for n in layer_bits.get(kind, {})
                   if not isinstance(modules.get(n), cls)]
        if unknown:
            raise ValueError(f'layer bits: {kind} layers {unknown[:5]} are not '
                             f'{cls.__name__}s of this model')
    for kind in ('weights', 'activations'):
        for name, bits in layer_bits.get(kind, {}).items():
            set_bits(modules[name], bits)
    return quant_summary(model)


# ---------------------------------------------------------------- tracing


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Sources(TorchFunctionMode):
    """Follow which stored tensors every intermediate tensor derives from (cat, resize, pool)."""

    def __init__(self):
        super().__init__()
        self.src = {}
        self.keep = []   # tracked tensors stay alive so that their ids are not reused

    def sources(self, tensor) -> frozenset:
        return self.src.get(id(tensor), frozenset())

    def mark(self, tensor, keys):
        self.src[id(tensor)] = frozenset(keys)
        self.keep.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = set()
        for t in _tensors((args, kwargs)):
            found |= self.src.get(id(t), frozenset())
        if found:
            for t in _tensors(out):
                self.mark(t, found)
        return out


@dataclass
class _Stored:
    """One tensor an integer deployment keeps in memory."""

    name: str
    numel: int
    bits: int
    produced: int
    last: int = -1
    fused: bool = False   # a conv accumulator requantized on the fly: never stored

    @property
    def nbytes(self) -> int:
        return (self.numel * self.bits + 7) // 8


def trace_layers(model: nn.Module, input_shape, input_bits: int = ACC_BITS) -> dict:
    """
    One forward pass (zeros of ``input_shape``) recorded as the steps of an integer deployment.

    A step is a QConv2d (fused with the ReLU and the activation quantizer that follow it) or a
    stand-alone activation quantizer (network input, up-sampling, concatenation); the
    network input is stored at ``input_bits`` (float32: 32; a uint8 camera frame: 8). Returns
    ``{'events': [...], 'tensors': {...}, 'steps': n}``: each event names its layer, the
    stored tensors it reads and writes, and for convs the MACs and the input quantizers.
    """
    names = {id(m): n for n, m in model.named_modules()}
    events, tensors, pending = [], {}, {}
    mode = _Sources()

    def consume(keys, e):
        for key in keys:
            t = tensors.get(key)
            if t is not None and not t.fused:
                t.last = max(t.last, e)
                events[e]['in'].append(key)

    def conv_pre(module, inputs):
        e = len(events)
        events.append({'kind': 'conv', 'name': names[id(module)], 'module': module,
                       'in': [], 'out': [], 'macs': 0})
        pending.setdefault(id(module), []).append(e)
        consume(mode.sources(inputs[0]), e)

    def conv_post(module, inputs, output):
        e = pending[id(module)].pop()
        k = module.kernel_size[0] * module.kernel_size[1]
        events[e]['macs'] = output.numel() * k * module.in_channels // module.groups
        key = ('acc', e)
        tensors[key] = _Stored(names[id(module)], output.numel(), ACC_BITS, e)
        events[e]['out'].append(key)
        mode.mark(output, {key})

    def act_post(module, inputs, output):
        srcs = mode.sources(inputs[0])
        accs = [k for k in srcs if k[0] == 'acc' and tensors[k].last < 0
                and not tensors[k].fused]
        if accs:   # conv -> ReLU -> quantizer: one fused integer layer
            e = accs[0][1]
            for k in accs:
                tensors[k].fused = True
                events[k[1]]['out'].remove(k)
        else:
            e = len(events)
            events.append({'kind': 'quant', 'name': names[id(module)], 'module': module,
                           'in': [], 'out': [], 'macs': 0})
        consume(srcs - set(accs), e)
        key = ('q', len(tensors))
        tensors[key] = _Stored(names[id(module)], output.numel(), int(module.bits), e)
        events[e]['out'].append(key)
        mode.mark(output, {key})

    hooks = []
    for m in model.modules():
        if isinstance(m, QConv2d):
            hooks.append(m.register_forward_pre_hook(conv_pre))
            hooks.append(m.register_forward_hook(conv_post))
        elif isinstance(m, ActQuant):
            hooks.append(m.register_forward_hook(act_post))
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device('cpu'))
    x = torch.zeros(*input_shape, device=device)
    tensors[('input', 0)] = _Stored('input', x.numel(), int(input_bits), 0)
    try:
        with torch.no_grad(), mode:
            mode.mark(x, {('input', 0)})
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for ev in events:
        ev['in_quants'] = [tensors[k].name for k in ev['in'] if k[0] == 'q']
        ev['in_bits'] = max((tensors[k].bits if k[0] == 'q' else UNQUANTIZED_OPERAND_BITS
                             for k in ev['in']), default=UNQUANTIZED_OPERAND_BITS)
    return {'events': events, 'tensors': tensors, 'steps': len(events)}


def footprint_table(model: nn.Module, input_shape, input_bits: int = ACC_BITS) -> list:
    """
    Per-layer memory of an integer deployment, as MCU deployment tables give it.

    One row per step (see ``trace_layers``), in execution order: ``layer``, ``kind``
    ('conv' or 'quant'), ``weight_bits``, ``act_bits`` (the conv's input operand width, or the
    quantizer's width), ``params`` (weights), ``bias``, ``weight_bytes`` (weights packed at
    their width + int32 biases: flash), ``macs``, ``in_bytes`` and ``out_bytes`` (the stored
    tensors the step reads and writes, packed at their widths), and ``peak_act_bytes``: every
    stored tensor alive during the step (its inputs, its output and skip tensors waiting for
    a later concatenation: SRAM). The network input counts at ``input_bits`` (default
    float32; 8 for a uint8 frame), a conv output that no quantizer follows (the head) as
    32-bit. The model's flash is the sum of ``weight_bytes``,
    its SRAM the maximum of ``peak_act_bytes``.
    """
    trace = trace_layers(model, input_shape, input_bits)
    tensors, last_step = trace['tensors'], trace['steps'] - 1
    stored = [t for t in tensors.values() if not t.fused]

    def end(t):
        return t.last if t.last >= 0 else last_step

    rows = []
    for e, ev in enumerate(trace['events']):
        m = ev['module']
        conv = ev['kind'] == 'conv'
        params = m.weight.numel() if conv else 0
        bias = m.bias.numel() if conv and m.bias is not None else 0
        rows.append({
            'layer': ev['name'], 'kind': ev['kind'],
            'weight_bits': int(m.bits) if conv else None,
            'act_bits': ev['in_bits'] if conv else int(m.bits),
            'params': params, 'bias': bias,
            'weight_bytes': (params * int(m.bits) + 7) // 8 + bias * BIAS_BITS // 8
            if conv else 0,
            'macs': ev['macs'],
            'in_bytes': sum(tensors[k].nbytes for k in ev['in']),
            'out_bytes': sum(tensors[k].nbytes for k in ev['out']),
            'peak_act_bytes': sum(t.nbytes for t in stored if t.produced <= e <= end(t)),
        })
    return rows


def format_footprint(rows) -> str:
    """Return footprint rows as a Markdown table with a total line (flash sum, SRAM peak)."""
    lines = ['| layer | kind | W bits | A bits | params | MACs | weights (B) | in (B) | '
             'out (B) | peak act. (B) |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['weight_bits'] or ''} | "
                     f"{r['act_bits']} | {r['params']} | {r['macs']} | {r['weight_bytes']} | "
                     f"{r['in_bytes']} | {r['out_bytes']} | {r['peak_act_bytes']} |")
    lines.append(f"| **total** | | | | {sum(r['params'] for r in rows)} | "
                 f"{sum(r['macs'] for r in rows)} | {sum(r['weight_bytes'] for r in rows)} | "
                 f"| | {max((r['peak_act_bytes'] for r in rows), default=0)} (max) |")
    return '\n'.join(lines) + '\n'


def hardware_cost(model: nn.Module, input_shape) -> dict:
    """
    Hardware figures of the model at its current integer widths.

    ``sum_bits`` (the study's sum over every quantizer), ``model_size_bits`` (weights x
    weight bits), ``bias_bits`` (int32 biases), ``bitops`` (MACs x weight bits x input bits)
    and ``macs``; only the quantized convs count (float layers have no width to learn).
    """
    trace = trace_layers(model, input_shape)
    convs = [ev for ev in trace['events'] if ev['kind'] == 'conv']
    quants = [m for m in model.modules() if isinstance(m, (QConv2d, ActQuant))]
    qconvs = [m for m in model.modules() if isinstance(m, QConv2d)]
    return {
        'sum_bits': int(sum(int(m.bits) for m in quants)),
        'model_size_bits': int(sum(m.weight.numel() * int(m.bits) for m in qconvs)),
        'bias_bits': int(sum(m.bias.numel() * BIAS_BITS for m in qconvs if m.bias is not None)),
        'bitops': int(sum(ev['macs'] * int(ev['module'].bits) * ev['in_bits'] for ev in convs)),
        'macs': int(sum(ev['macs'] for ev in convs)),
    }


# ---------------------------------------------------------------- learned widths


@contextlib.contextmanager
def _kept_running_stats(model):
    """Extra forward passes must not move BatchNorm running statistics (study scheme)."""
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()})
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for m, state in saved:
            m.load_state_dict(state)


class LearnedBits(nn.Module):
    """
    Trainable bit widths of a model made by ``quantize_model`` (and calibrated).

    ``mode='per_layer'``: one width per QConv2d weight tensor and one per ActQuant (mixed
    precision); ``mode='uniform'``: one width for all weights and one for all activations (the
    study). ``hardware``: 'sum_bits' (the study: alpha x sum of N over all quantizers),
    'size' (alpha x sum weights_l x N_w,l / its 8-bit value) or 'bitops' (alpha x sum MACs_l x
    N_w,l x N_a,l / its 8-bit value, N_a,l the width of the conv's input; needs
    ``input_shape``). ``normalize`` (default: False for sum_bits, as in the study; True for
    the others) divides by the 8-bit value. The widths have their own optimizer (``'sgd'`` or
    ``'adam'``, ``lr``), update every ``bit_update_every`` calls of ``step`` and stay in [2, 8].

    The model is not registered as a sub-module: ``parameters()`` / ``state_dict()`` hold the
    widths only (``n``), so the model's optimizer never sees them.
    """

    def __init__(self, model: nn.Module, mode: str = 'per_layer', lam: float = 0.97,
                 alpha: float = 4.0, hardware: str = 'sum_bits', init_bits=8,
                 lr: float = 0.05, optimizer: str = 'sgd', bit_update_every: int = 1,
                 normalize=None, input_shape=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f'mode={mode!r} must be one of {MODES}')
        if hardware not in HARDWARE:
            raise ValueError(f'hardware={hardware!r} must be one of {HARDWARE}')
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f'lam={lam} outside [0, 1]')
        if bit_update_every < 1:
            raise ValueError(f'bit_update_every={bit_update_every} must be >= 1')
        if hardware == 'bitops' and input_shape is None:
            raise ValueError("hardware='bitops' needs input_shape (MACs come from a forward)")
        object.__setattr__(self, 'model', model)   # not a sub-module (see the class doc)
        self.mode, self.lam, self.alpha, self.hardware = mode, float(lam), float(alpha), hardware
        self.normalize = (hardware != 'sum_bits') if normalize is None else bool(normalize)
        self.bit_update_every = int(bit_update_every)
        self.input_shape = input_shape
        self.frozen = False
        self._calls = 0
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QConv2d)]
        acts = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]
        if not convs:
            raise ValueError('no QConv2d in the model: call quantize_model first')
        uncalibrated = [n for n, m in acts if not bool(m.calibrated)]
        if uncalibrated:
            raise ValueError(f'activation quantizers not calibrated ({uncalibrated[:3]}): '
                             'call calibrate first')
        # Quantizers: (kind, name, module, group).
        self.quantizers = []
        self.group_names = []
        if mode == 'uniform':
            for kind, members in (('weights', convs), ('activations', acts)):
                if members:
                    self.group_names.append(kind)
                    g = len(self.group_names) - 1
                    self.quantizers += [(kind, n, m, g) for n, m in members]
        else:
            for kind, members in (('weights', convs), ('activations', acts)):
                for n, m in members:
                    self.group_names.append(f'{kind}:{n}')
                    self.quantizers.append((kind, n, m, len(self.group_names) - 1))
        self.groups = [[m for _, _, m, g in self.quantizers if g == i]
                       for i in range(len(self.group_names))]
        if init_bits is None:
            init = [sum(m.bits for m in members) / len(members) for members in self.groups]
        else:
            if not MIN_BITS <= float(init_bits) <= MAX_BITS:
                raise ValueError(f'init_bits={init_bits} outside {MIN_BITS}..{MAX_BITS}')
            init = [float(init_bits)] * len(self.groups)
        self.n = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        # Hardware-loss constants, one entry per QConv2d.
        group_of = {id(m): g for _, _, m, g in self.quantizers}
        act_group = {n: group_of[id(m)] for n, m in acts}
        # Buffers (not saved) so that ``.to(device)`` moves them with ``n``.
        self.register_buffer('_q_group', torch.tensor([g for *_, g in self.quantizers]),
                             persistent=False)
        self.register_buffer('_w_group', torch.tensor([group_of[id(m)] for _, m in convs]),
                             persistent=False)
        self.register_buffer('_params', torch.tensor([float(m.weight.numel())
                                                      for _, m in convs]), persistent=False)
        self.register_buffer('_macs', None, persistent=False)
        self._operand_groups = None
        if input_shape is not None:
            events = {ev['name']: ev for ev in trace_layers(model, input_shape)['events']
                      if ev['kind'] == 'conv'}
            self._macs = torch.tensor([float(events[n]['macs']) if n in events else 0.0
                                       for n, _ in convs])
            self._operand_groups = [[act_group[q] for q in events[n]['in_quants']]
                                    if n in events else [] for n, _ in convs]
        if optimizer == 'sgd':
            self.optimizer = torch.optim.SGD([self.n], lr=lr)
        elif optimizer == 'adam':
            self.optimizer = torch.optim.Adam([self.n], lr=lr)
        else:
            raise ValueError(f"optimizer={optimizer!r} must be 'sgd' or 'adam'")
        self.sync()

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load ``n`` (to resume training) and make the quantizers follow it."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.sync()
        return result

    # -------------------------------------------------------- widths

    def _layer_dict(self, values) -> dict:
        out = {'weights': {}, 'activations': {}}
        for kind, name, _, g in self.quantizers:
            out[kind][name] = values[g]
        return out

    def bits(self) -> dict:
        """Continuous widths: ``{'weights': {layer: N}, 'activations': {layer: N}}``."""
        return self._layer_dict([float(v) for v in self.n.detach()])

    def rounded(self) -> dict:
        """Integer widths (``round_bits``: half up, clamped to 2..8), same layout as bits()."""
        return self._layer_dict([round_bits(v) for v in self.n.detach()])

    def sync(self):
        """Make every quantizer use its group's rounded width (keeping activation ranges)."""
        for _, _, module, g in self.quantizers:
            set_bits(module, round_bits(self.n[g].detach()))

    def apply_rounded(self) -> dict:
        """
        Freeze the integer widths into the quantizers and stop learning them.

        Returns the widths (``rounded()``), also left on the model as ``model.layer_bits`` for
        metadata; ``step`` refuses to run afterwards.
        """
        with torch.no_grad():
            self.n.copy_(_round_tensor(self.n))
        self.sync()
        self.frozen = True
        rounded = self.rounded()
        self.model.layer_bits = rounded
        return rounded

    @contextlib.contextmanager
    def _group_at(self, g, bits):
        """Temporarily quantize group ``g`` with ``bits`` (steps restored exactly after)."""
        saved = [(m, m.bits, m.scale.detach().clone() if isinstance(m, ActQuant) else None)
                 for m in self.groups[g]]
        try:
            for m in self.groups[g]:
                set_bits(m, bits)
            yield
        finally:
            with torch.no_grad():
                for m, b, scale in saved:
                    m.bits = b
                    if scale is not None:
                        m.scale.copy_(scale)

    # -------------------------------------------------------- losses and gradients

    def _ste_bits(self) -> torch.Tensor:
        """Return the rounded widths, with an identity gradient to ``n`` (straight through)."""
        return self.n + (_round_tensor(self.n) - self.n).detach()

    def hardware_loss(self) -> torch.Tensor:
        """L_hard at the rounded widths, differentiable in ``n`` (straight-through rounding)."""
        r = self._ste_bits()
        if self.hardware == 'sum_bits':
            total, ref = r[self._q_group].sum(), float(MAX_BITS * len(self.quantizers))
        elif self.hardware == 'size':
            total = (self._params * r[self._w_group]).sum()
            ref = MAX_BITS * float(self._params.sum())
        else:
            if self._macs is None:
                raise ValueError("hardware='bitops' needs input_shape")
            eight = r.new_tensor(float(UNQUANTIZED_OPERAND_BITS))
            operands = torch.stack([torch.stack([r[g] for g in gs]).max() if gs else eight
                                    for gs in self._operand_groups])
            total = (self._macs * r[self._w_group] * operands).sum()
            ref = MAX_BITS * MAX_BITS * float(self._macs.sum())
        if self.normalize:
            total = total / ref
        return self.alpha * total

    def hardware_grad(self) -> torch.Tensor:
        """Compute dL_hard/dN per group."""
        with torch.enable_grad():
            return torch.autograd.grad(self.hardware_loss(), self.n)[0].detach()

    def _finite_differences(self, batch_loss_fn, loss=None):
        model = self.model
        with torch.no_grad(), _kept_running_stats(model):
            base = float(loss) if loss is not None else float(batch_loss_fn())
            diffs = []
            for g in range(len(self.groups)):
                b = round_bits(self.n[g].detach())
                if b > MIN_BITS:
                    with self._group_at(g, b - 1):
                        diffs.append(base - float(batch_loss_fn()))
                else:   # 1 bit has no symmetric grid: forward difference L(3) - L(2)
                    with self._group_at(g, b + 1):
                        diffs.append(float(batch_loss_fn()) - base)
        return base, torch.tensor(diffs, dtype=self.n.dtype, device=self.n.device)

    def gradients(self, batch_loss_fn, loss=None) -> dict:
        """
        Compute the study's bit-width gradient per group, without updating anything.

        ``batch_loss_fn()`` returns the task loss of one fixed batch with the model as it is;
        ``loss`` (optional) is that value already computed at the current widths with the
        current weights (saves one forward). Returns ``{'loss', 'task_diff', 'hardware',
        'grad'}``: 'task_diff' holds L_task(N) - L_task(N - 1), 'hardware' dL_hard/dN and
        'grad' lam x task_diff + (1 - lam) x hardware, each as a per-group tensor (order:
        ``group_names``).
        """
        base, diffs = self._finite_differences(batch_loss_fn, loss)
        hard = self.hardware_grad()
        grad = self.lam * diffs + (1.0 - self.lam) * hard
        return {'loss': base, 'task_diff': diffs, 'hardware': hard, 'grad': grad}

    def step(self, batch_loss_fn, loss=None):
        """
        Update the widths (every ``bit_update_every`` calls; otherwise return None).

        Call it once per training step, after ``loss.backward()`` and before the model
        optimizer's ``step()`` if you pass ``loss`` (the weights must be the ones ``loss`` was
        computed with), or anywhere without it. Costs one forward per group (uniform mode: 2)
        plus one without ``loss``. Returns the ``gradients`` dict plus 'bits' (after the
        update).
        """
        if self.frozen:
            raise RuntimeError('bit widths were frozen by apply_rounded()')
        self._calls += 1
        if self._calls % self.bit_update_every:
            return None
        info = self.gradients(batch_loss_fn, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.n.grad = info['grad'].clone()
        self.optimizer.step()
        with torch.no_grad():
            self.n.clamp_(MIN_BITS, MAX_BITS)
        self.sync()
        info['bits'] = self.bits()
        return info

    def cost(self, input_shape=None) -> dict:
        """Compute ``hardware_cost`` at the current widths (default: the init input_shape)."""
        input_shape = input_shape or self.input_shape
        if input_shape is None:
            raise ValueError('cost needs an input_shape')
        return hardware_cost(self.model, input_shape)


# ---------------------------------------------------------------- export


class _Clip(nn.Module):
    """Clip to +-bound: the b-bit clipping range, exported as an ONNX Clip before the QDQ."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = float(bound)

    def forward(self, x):
        return torch.clamp(x, -self.bound, self.bound)


def export_learned(model: nn.Module, meta: dict, path, opset: int = 17, clip: bool = True):
    """
    Export a model with learned (mixed, <= 8-bit) widths as int8 QDQ ONNX; return metadata.

    Every layer of b <= 8 bits is stored in int8 containers with its b-bit step as the QDQ
    scale, so its b-bit integers (at most +-(2^(b-1) - 1)) are int8 values on the same grid:
    weights (per-channel step max|w| / qmax_b) quantize to exactly the trained b-bit integers,
    and so do activations inside their range. int8 would only saturate at +-127 steps, far
    outside a b-bit range of +-qmax_b steps; with ``clip`` (default) an ONNX Clip at
    +-qmax_b x step before each sub-8-bit activation QuantizeLinear keeps the learned clipping
    range, so the ONNX model computes what the trained fake-quantized model computes. (The
    other choice, one int8 scale spanning the b-bit range, would keep the range but put the
    b-bit grid points between int8 codes.) TensorRT then runs every layer in int8; the true
    widths, for FPGA or MCU sizing, go into ``quantization.layer_bits`` with
    ``model_size_bits``, ``bias_bits``, ``bitops`` and ``macs`` (``hardware_cost``).
    The export works on a copy; ``model`` is left as it is.
    """
    from .export import check_tensorrt_qdq, export_onnx
    check_signed_symmetric(model)
    layer_bits = quant_summary(model)
    for kind, widths in layer_bits.items():
        for name, bits in widths.items():
            if not MIN_BITS <= int(bits) <= MAX_BITS:
                raise ValueError(f'{kind} {name}: {bits} bits outside {MIN_BITS}..{MAX_BITS}')
    shape = meta['inputs'][0]['shape']
    cost = hardware_cost(model, shape)
    out = copy.deepcopy(model).eval()
    # deepcopy keeps the bias links (weak references) pointing at the original quantizers.
    link_bias_quantizers(out, torch.zeros(1, *shape[1:]))
    for m in out.modules():
        if isinstance(m, (ActQuant, QConv2d)):
            m.freeze()
    clipped = 0
    if clip:
        for parent in list(out.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, ActQuant) and child.bits < 8 \
                        and child.frozen_scale is not None:
                    bound = qrange(child.bits)[1] * child.frozen_scale
                    setattr(parent, child_name, nn.Sequential(_Clip(bound), child))
                    clipped += 1
    quant = dict(meta.get('quantization') or {})
    quant.update({
        'scheme': 'qdq-int8-symmetric',
        'weights': {'bits': 8, 'per_channel': True, 'symmetric': True},
        'activations': {'bits': 8, 'symmetric': True, 'per_tensor': True},
        'container_bits': 8,
        'layer_bits': {kind: {k: int(v) for k, v in widths.items()}
                       for kind, widths in layer_bits.items()},
        'clipped_activations': clipped,
        **cost,
    })
    meta = dict(copy.deepcopy(meta), quantization=quant)
    meta = export_onnx(out, meta, path, opset=opset)
    problems = check_tensorrt_qdq(path)
    if problems:
        raise ValueError(f'{path} breaks TensorRT Q/DQ rules: ' + '; '.join(problems))
    return meta
