"""CUDA's autocast rules on the CPU, for tests: which dtype each operation gives under bf16 autocast on a GPU.

CPU and CUDA autocast run different lists of operations in float32. On the CPU softmax, layer and group norm,
vector norms, sums, exp/log and most losses stay in bf16; on CUDA they run in float32, so their outputs meet bf16
tensors downstream, and an operation that needs equal dtypes (``scatter``, ``index_copy``, ``masked_fill`` with
float32's lowest value) fails there only. Inside :func:`cuda_autocast`, CPU bf16 autocast gives these operations
float32 inputs, as CUDA's does, and runs ``cat``, ``stack`` and ``index_copy`` with no autocast rule, as CUDA has
none for them (the CPU promotes their inputs to the widest dtype). Matrix products stay in bf16 (the same on both).

The lists follow PyTorch's autocast reference ("CUDA Ops that can autocast to float32"); an approximation of a GPU
run that finds dtype mismatches before a GPU is lent, not a replacement for one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

_T = torch.Tensor
# operations CUDA autocast runs in float32 (the Python entry points that reach them)
FLOAT32 = frozenset(
    {
        F.softmax,
        F.log_softmax,
        F.softmin,
        _T.softmax,
        _T.log_softmax,
        torch.softmax,
        torch.log_softmax,
        F.layer_norm,
        F.group_norm,
        torch.layer_norm,
        torch.group_norm,
        F.normalize,
        _T.norm,
        torch.norm,
        torch.linalg.vector_norm,
        torch.linalg.norm,
        _T.sum,
        torch.sum,
        _T.cumsum,
        torch.cumsum,
        _T.prod,
        torch.prod,
        _T.exp,
        torch.exp,
        _T.expm1,
        torch.expm1,
        _T.log,
        torch.log,
        _T.log1p,
        torch.log1p,
        _T.rsqrt,
        torch.rsqrt,
        _T.reciprocal,
        torch.reciprocal,
        _T.pow,
        torch.pow,
        _T.__pow__,
        _T.__rpow__,
        F.softplus,
        F.cosine_similarity,
        torch.cosine_similarity,
        torch.cdist,
        F.mse_loss,
        F.l1_loss,
        F.smooth_l1_loss,
        F.huber_loss,
        F.kl_div,
        F.nll_loss,
        F.cross_entropy,
        F.binary_cross_entropy_with_logits,
    }
)
# operations with a CPU autocast rule (promote to the widest input) and none on CUDA
NO_RULE = frozenset({torch.cat, torch.concat, torch.stack, _T.index_copy, _T.index_copy_})
LOW = (torch.bfloat16, torch.float16)


def _to_float32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in LOW else x


class _CudaRules(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            if func is F.binary_cross_entropy:
                raise RuntimeError("CUDA autocast refuses binary_cross_entropy (use the with_logits form)")
            if func in NO_RULE:
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **kwargs)
            if func in FLOAT32 and kwargs.get("dtype") is None:
                args, kwargs = tree_map(_to_float32, (args, kwargs))
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast():
    """Within: CPU bf16 autocast (where code enters it) follows CUDA's rules of :data:`FLOAT32` and
    :data:`NO_RULE`."""
    with _CudaRules():
        yield
