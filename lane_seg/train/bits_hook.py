"""
``--learn-bits``: the training-loop hook that learns bit widths with a hardware loss.

Wraps ``lane_seg.models.bitwidth.LearnedBits`` (issue #8): after each backward pass it takes the
study's finite-difference bit gradient on the global batch (``batch_loss`` is the loop's
collective, so every rank moves the widths identically), its state goes into resumable
checkpoints, and at the end the rounded widths are frozen into the quantizers and written to the
model metadata (``quantization.layer_bits`` plus size and bit operations).
"""

import torch


class LearnBitsHook:
    """Loop hook; needs a fake-quantized, calibrated model (--quant-bits or a quantized init)."""

    name = 'learned_bits'

    def __init__(self, cfg):
        self.cfg = cfg
        self.bits = None
        self.shape = None
        self._pending = None

    def setup(self, model, meta, env):
        from ..models.bitwidth import LearnedBits
        if not meta['architecture'].get('quant'):
            raise ValueError('--learn-bits needs a quantized model: add --quant-bits 8 '
                             '(or start from a quantized checkpoint)')
        self.shape = [1] + list(meta['inputs'][0]['shape'][1:])
        self.bits = LearnedBits(model, mode=self.cfg.learn_bits, lam=self.cfg.bits_lambda,
                                alpha=self.cfg.bits_alpha, hardware=self.cfg.bits_hardware,
                                init_bits=None, lr=self.cfg.bits_lr,
                                optimizer=self.cfg.bits_optimizer,
                                bit_update_every=self.cfg.bits_every, input_shape=self.shape)
        if self._pending:
            self.bits.load_state_dict({'n': torch.tensor(self._pending['n'])})

    def after_backward(self, ctx):
        self.bits.step(ctx.batch_loss, loss=ctx.loss)

    def state(self) -> dict:
        return {'n': self.bits.n.detach().cpu().tolist()} if self.bits is not None else {}

    def load_state(self, state: dict):
        if state.get('n') is not None:
            self._pending = state

    def finish(self, model, meta):
        from ..models.bitwidth import hardware_cost
        widths = self.bits.apply_rounded()
        quant = dict(meta['quantization'])
        quant['layer_bits'] = widths
        quant['scheme'] = 'learned-bit-widths'
        quant.update(hardware_cost(model, self.shape))
        quant['learned'] = {'mode': self.cfg.learn_bits, 'hardware': self.cfg.bits_hardware,
                            'lambda': self.cfg.bits_lambda, 'alpha': self.cfg.bits_alpha,
                            'lr': self.cfg.bits_lr, 'every': self.cfg.bits_every,
                            'optimizer': self.cfg.bits_optimizer}
        meta['quantization'] = quant
