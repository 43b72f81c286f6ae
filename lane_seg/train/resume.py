"""
Resumable training state: ``RUN/last.safetensors`` + ``RUN/last.json``, never pickle.

The tensors (model and optimizer state) go to safetensors, everything else to the JSON beside
it: ``epoch`` and ``step`` at the top level, and under ``resume`` the scheduler state, the RNG
states (python, the numpy Generator, torch and CUDA), the quantizer flags, the running loss of
the current epoch and the history of validation metrics. The JSON also records the sha256 of
the safetensors file, so a pair written by two different saves (a job killed between the two
renames) or a changed file is recognised.

A save writes ``RUN/.next.*`` completely, moves ``last.*`` to ``prev.*``, then ``.next.*`` to
``last.*``: wherever a kill lands, one consistent pair remains, and ``locate('auto')`` picks
the consistent pair with the highest step.
"""

import json
import os
from pathlib import Path
import random

import numpy as np

from ..file_hash import file_sha256
from ..models import checkpoint
from ..models.checkpoint import CheckpointError

LAST, PREV, NEXT = 'last', 'prev', '.next'
# Settings that must not change across a resume (the step plan and the optimisation use them).
RESUME_KEYS = ('seed', 'batch', 'epochs', 'lr', 'weight_decay', 'crop', 'input_size',
               'dice_weight', 'quant_bits', 'act_bits', 'quant_scheme', 'unsigned_relu',
               'weight_clip', 'act_clip', 'first_layer_bits', 'layer_bits')


def capture_rng(np_rng) -> dict:
    """Return the RNG states (python, numpy Generator, torch, CUDA) as JSON values."""
    import torch
    version, values, gauss = random.getstate()
    state = {'python': [version, list(values), gauss],
             'numpy': np_rng.bit_generator.state,
             'torch': torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict, np_rng):
    import torch

    def tensor(text):
        return torch.from_numpy(np.frombuffer(bytes.fromhex(text), np.uint8).copy())

    version, values, gauss = state['python']
    random.setstate((version, tuple(values), gauss))
    np_rng.bit_generator.state = state['numpy']
    torch.set_rng_state(tensor(state['torch']))
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state['cuda']])


def quantizer_state(model) -> dict:
    """
    Record the quantizer settings that are not tensors (scales and observers are weights).

    Bit widths are Python attributes: learned (mixed-precision) widths must survive a resume.
    """
    from ..models.quant import ActQuant, QConv2d
    return {'activations': {name: {'bits': m.bits, 'mode': m.mode, 'enabled': m.enabled,
                                   'calibrated': bool(m.calibrated)}
                            for name, m in model.named_modules() if isinstance(m, ActQuant)},
            'weights': {name: {'bits': m.bits} for name, m in model.named_modules()
                        if isinstance(m, QConv2d)}}


def restore_quantizers(model, state: dict):
    from ..models.quant import ActQuant, QConv2d
    acts, weights = state.get('activations', {}), state.get('weights', {})
    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and name in acts:
            m.bits = int(acts[name]['bits'])
            m.enabled = bool(acts[name]['enabled'])
            m.calibrating = False
        elif isinstance(m, QConv2d) and name in weights:
            m.bits = int(weights[name]['bits'])


def save_state(out, model, meta: dict, optimizer, state: dict) -> Path:
    """Write ``out/last.safetensors`` + ``.json`` (the previous pair becomes ``prev``)."""
    out = Path(out)
    tmp = out / f'{NEXT}.safetensors'
    extra = {'epoch': state['epoch'], 'step': state['step'], 'resume': state}
    checkpoint.save(tmp, model, meta, optimizer=optimizer, extra=extra)
    side = tmp.with_suffix('.json')
    info = json.loads(side.read_text())
    info['tensors_sha256'] = file_sha256(tmp)
    side.write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')
    for ext in ('.safetensors', '.json'):
        if (out / f'{LAST}{ext}').exists():
            os.replace(out / f'{LAST}{ext}', out / f'{PREV}{ext}')
    for ext in ('.safetensors', '.json'):
        os.replace(out / f'{NEXT}{ext}', out / f'{LAST}{ext}')
    return out / f'{LAST}.safetensors'


def _check_pair(path: Path):
    """Return (info, problem) for a candidate pair; info is None when it is unusable."""
    side = path.with_suffix('.json')
    if not path.exists() or not side.exists():
        return None, f'{path.name} or {side.name} missing'
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f'{side.name} unreadable ({exc})'
    sha = info.get('tensors_sha256')
    if sha and sha != file_sha256(path):
        return None, f'{path.name} does not match {side.name} (sha256 differs)'
    return info, ''


def locate(spec: str, out) -> Path | None:
    """
    Resolve ``--resume``: a checkpoint file, a run folder, or 'auto' (the run folder ``out``).

    For a folder, return the consistent ``last``/``prev`` pair with the highest step. 'auto'
    returns None when the folder holds no checkpoint at all (a first launch); a folder whose
    checkpoints are all damaged is refused, never silently restarted.
    """
    if spec != 'auto' and not Path(spec).is_dir():
        return Path(spec)
    folder = Path(out) if spec == 'auto' else Path(spec)
    best, problems, seen = None, [], False
    for stem in (LAST, PREV, NEXT):
        path = folder / f'{stem}.safetensors'
        if not path.exists() and not path.with_suffix('.json').exists():
            continue
        seen = True
        info, problem = _check_pair(path)
        if info is None:
            problems.append(problem)
        elif best is None or info.get('step', -1) > best[1].get('step', -1):
            best = (path, info)
    if best is not None:
        return best[0]
    if seen:
        raise CheckpointError(f'{folder}: no usable checkpoint to resume from: '
                              + '; '.join(problems))
    if spec == 'auto':
        return None
    raise CheckpointError(f'{folder}: no resumable checkpoint ({LAST}.safetensors) in this '
                          'folder')


def _diff(theirs, mine, prefix=''):
    if isinstance(theirs, dict) and isinstance(mine, dict):
        out = []
        for key in sorted(set(theirs) | set(mine)):
            out += _diff(theirs.get(key), mine.get(key), f'{prefix}{key}.')
        return out
    return [] if theirs == mine else [f'{prefix[:-1]}: checkpoint {theirs!r}, this run {mine!r}']


def load_state(path, task: str, architecture: dict, config: dict, n_train: int):
    """
    Check a training checkpoint against this run and rebuild its model.

    Returns (model, tensors, info). Refuses, with a CheckpointError naming the file and the
    mismatch, a missing, truncated or inconsistent file, another task's checkpoint, a model-only
    checkpoint, another architecture, other settings (``RESUME_KEYS``) or another training set
    size.
    """
    path = Path(path)
    tensors, info = checkpoint.read(path)
    sha = info.get('tensors_sha256')
    if sha and sha != file_sha256(path):
        raise CheckpointError(f'{path}: tensors do not match {path.with_suffix(".json").name} '
                              '(sha256 differs): the file was changed or the two come from '
                              'different saves')
    if info.get('task') != task:
        raise CheckpointError(f'{path}: checkpoint is for task {info.get("task")!r}, '
                              f'not {task!r}')
    if info.get('kind') != checkpoint.KIND_TRAINING or 'resume' not in info:
        raise CheckpointError(f'{path}: not a resumable training checkpoint (kind '
                              f'{info.get("kind")!r}, no optimizer and progress state); to '
                              'fine-tune from a model checkpoint use --init')
    diffs = _diff(info.get('architecture'), json.loads(json.dumps(architecture)))
    if diffs:
        raise CheckpointError(f'{path}: checkpoint architecture does not match this run: '
                              + '; '.join(diffs))
    saved = info.get('training', {}).get('config', {})
    mine = json.loads(json.dumps(config))
    diffs = [f'{key}: checkpoint {saved[key]!r}, this run {mine[key]!r}'
             for key in RESUME_KEYS if key in saved and key in mine and saved[key] != mine[key]]
    if info['resume'].get('n_train') != n_train:
        diffs.append(f'training samples: checkpoint {info["resume"].get("n_train")}, '
                     f'this run {n_train}')
    if diffs:
        raise CheckpointError(f'{path}: cannot resume with other settings: ' + '; '.join(diffs))
    model, _ = checkpoint.load_model(path, task=task)
    restore_quantizers(model, info['resume'].get('quantizers', {}))
    return model, tensors, info
