"""Scatter helpers on torch's own index_add_ (no compiled extension needed)."""

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[index[k]] += src[k] along dim 0."""
    out = torch.zeros((dim_size,) + src.shape[1:], dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)


def scatter_max(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[i] = max of src[k] over the k with index[k] == i, along dim 0 (element-wise over the
    other dimensions); 0 where no k has index i."""
    out = torch.zeros((dim_size,) + src.shape[1:], dtype=src.dtype, device=src.device)
    expanded = index
    for _ in range(src.dim() - 1):
        expanded = expanded.unsqueeze(-1)
    return out.scatter_reduce(0, expanded.expand_as(src), src, reduce="amax", include_self=False)
