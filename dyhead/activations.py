"""Activations shared by DyHead's attentions."""

import torch.nn.functional as F
from torch import Tensor


def hard_sigmoid(x: Tensor) -> Tensor:
    """relu6(x + 3) / 6, the released code's hard sigmoid (not the paper's clamp((x + 1) / 2, 0, 1)).

    x: any shape, any floating dtype; returns the same shape and dtype.
    """
    return F.relu6(x + 3.0) / 6.0
