"""Layers shared by families.

BatchNorm under a bf16 (or fp16) engine: DeepSpeed casts a module's parameters to the engine's
precision but leaves its buffers — BatchNorm's running statistics — in float32 (on every ZeRO
stage), and torch's batch_norm refuses bf16 weights beside float32 statistics. These layers are
nn.BatchNorm1d / nn.BatchNorm2d (the same parameters, buffers and state-dict names, and in float32
torch's own forward) that compute in float32 otherwise and return the input's dtype; statistics
an engine did cast are put back to float32.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Float32Stats:
    def forward(self, x):
        if self.track_running_stats and self.running_mean.dtype != torch.float32:  # an engine cast the buffers
            self.running_mean, self.running_var = self.running_mean.float(), self.running_var.float()
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return super().forward(x)
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        keep = not self.training or self.track_running_stats
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.batch_norm(x.float(), self.running_mean if keep else None, self.running_var if keep else None,
                            w, b, use_batch, momentum, self.eps).to(x.dtype)


class BatchNorm1d(_Float32Stats, nn.BatchNorm1d):
    pass


class BatchNorm2d(_Float32Stats, nn.BatchNorm2d):
    pass
