"""PyTorch checkpoints in and out: one import point for every converter.

Loss modules: `load_cankd_loss`, `export_cankd_loss` (the official
`NLKD_IN_Loss` key layout). Networks: see `cankd_jax.interop.torch_models`.
Arrays in state dicts may be torch tensors or numpy arrays; torch itself is only
imported where a `.pth` file is read or written.
"""

from cankd_jax.interop.torch_losses import export_cankd_loss, load_cankd_loss  # noqa: F401
