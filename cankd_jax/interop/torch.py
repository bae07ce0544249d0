"""PyTorch checkpoints in and out: one import point for every converter.

Loss modules: `load_cankd_loss`, `export_cankd_loss` (the official
`NLKD_IN_Loss` key layout). Networks: see `cankd_jax.interop.torch_models`.
Arrays in state dicts may be torch tensors or numpy arrays; torch itself is only
imported where a `.pth` file is read or written.
"""

from cankd_jax.interop.torch_losses import export_cankd_loss, load_cankd_loss  # noqa: F401
from cankd_jax.interop.torch_models import (  # noqa: F401
    LoadReport,
    default_key_prefixes,
    export_pytorch_network,
    export_state_dict,
    import_state_dict,
    load_checkpoint,
    load_pth,
    load_pytorch_network,
    load_resnet,
    prefix_pairs,
    save_pth,
    state_dict_layout,
    to_mmdet_keys,
)
