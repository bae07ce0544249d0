"""The trained student out of a run: Orbax and a PyTorch state dict, without teacher, connectors or loss modules."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from cankd_jax.interop import torch as torch_interop

PyTree = Any


def export_student(student: nn.Module, variables: PyTree, directory: str, *, pytorch: bool) -> None:
    """Write `variables` (`{'params', 'batch_stats'}` of `student`) to `directory` (Orbax) and `student.pth`.

    Every process calls this. Arrays spread over processes (FSDP) are gathered
    first (one compiled resharding of the whole tree), so the files hold whole
    arrays; process 0 writes the `.pth`.
    """
    leaves = jax.tree.leaves(variables)
    mesh = leaves[0].sharding.mesh if leaves and hasattr(leaves[0].sharding, "mesh") else None
    if mesh is not None:
        variables = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))(variables)
    host = jax.tree.map(np.asarray, variables)  # replicated: every process holds every element
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), host, force=True)
    ckptr.wait_until_finished()
    if pytorch and jax.process_index() == 0:
        torch_interop.export_pytorch_network(student, host, os.path.join(directory, "student.pth"))
