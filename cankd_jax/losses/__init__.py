"""Feature-distillation losses: CanKD, its ablation variants and the usual baselines.

Every loss is a Flax Linen module called as `loss(student, teacher, *, train)`
on NHWC feature maps, returning a float32 scalar; pick one by name with
`make_loss`. The teacher input never receives gradient.
"""

from cankd_jax.losses.at import ATLoss, attention_map
from cankd_jax.losses.cankd import (
    ATTENTIONS, CanKDAlignLoss, CanKDLoss, NonLocalBlock, SelfNonLocalLoss, default_inter_channels,
)
from cankd_jax.losses.connector import Connector
from cankd_jax.losses.cwd import CWDLoss
from cankd_jax.losses.fitnet import L2Loss
from cankd_jax.losses.in_mse import INMSELoss
from cankd_jax.losses.mgd import MGDLoss, mgd_keep_mask
from cankd_jax.losses.pkd import PKDLoss, pkd_normalize
from cankd_jax.losses.registry import LOSSES, loss_fields, make_loss

__all__ = [
    "ATLoss",
    "ATTENTIONS",
    "CWDLoss",
    "CanKDAlignLoss",
    "CanKDLoss",
    "INMSELoss",
    "Connector",
    "L2Loss",
    "LOSSES",
    "MGDLoss",
    "NonLocalBlock",
    "PKDLoss",
    "SelfNonLocalLoss",
    "attention_map",
    "default_inter_channels",
    "loss_fields",
    "make_loss",
    "mgd_keep_mask",
    "pkd_normalize",
]
