"""
Synchronized BatchNorm for DistributedDataParallel, on GPUs and on CPUs (gloo).

``torch.nn.SyncBatchNorm`` accepts GPU tensors only. ``PooledBatchNorm2d`` is a BatchNorm2d
whose training statistics are pooled over all ranks by one autograd-aware all-reduce of the
per-channel sums (in float64), so every rank normalises with the statistics of the global batch
and the gradients are those of one big batch. Same parameters and buffers as BatchNorm2d, so
checkpoints and BatchNorm folding are unchanged.
"""

import torch
from torch import nn
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all output gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch under torch.distributed."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xd = x.double()
        count = xd.new_full((1,), x.numel() / c)
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count])
        stats = _AllReduceSum.apply(local)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, c, 1, 1)
        inv = torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        y = (x - mean.to(x.dtype).view(shape)) * inv
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: str) -> nn.Module:
    """Return ``module`` with synchronized BatchNorm (torch's on CUDA, pooled elsewhere)."""
    if str(device).startswith('cuda'):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            pooled = PooledBatchNorm2d(child.num_features, child.eps, child.momentum,
                                       child.affine, child.track_running_stats)
            pooled.load_state_dict(child.state_dict())
            pooled.to(next(iter(child.buffers()), torch.zeros(())).device)
            pooled.train(child.training)
            setattr(module, name, pooled)
        else:
            convert_sync_batchnorm(child, device)
    return module
