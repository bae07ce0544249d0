"""Bridges to other frameworks' checkpoints (PyTorch: `cankd_jax.interop.torch`)."""
