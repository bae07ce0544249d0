"""Reading and writing PyTorch state dicts without surprises.

The importers in this package walk a state dict key by key through a
`StateDictReader`, which checks every shape, remembers what it consumed, and at
the end reports missing and unused keys by name. Conversions between PyTorch's
NCHW conv weights and our NHWC/Flax layouts live here too, so each importer only
says which key goes where.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np

TORCH_INSTALL_HINT = (
    "reading or writing PyTorch checkpoints needs torch; install the CPU build with "
    "`pip install torch==2.13.0` (or `pip install -e .[test]`)"
)


def require_torch():
    """Import torch lazily, with an install hint instead of a bare ImportError."""
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(TORCH_INSTALL_HINT) from e
    return torch


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, numpy array or jax array as a numpy array (no copy where possible)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight `(O, I, kh, kw)` -> Flax `(kh, kw, I, O)`."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_from_flax(k: np.ndarray) -> np.ndarray:
    """Flax conv kernel `(kh, kw, I, O)` -> PyTorch `(O, I, kh, kw)`."""
    return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def conv1x1_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch 1x1 conv weight `(O, I, 1, 1)` -> our `Conv1x1` kernel `(I, O)`."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight (O, I, 1, 1), got shape {w.shape}")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def conv1x1_from_flax(k: np.ndarray) -> np.ndarray:
    """Our `Conv1x1` kernel `(I, O)` -> PyTorch `(O, I, 1, 1)`."""
    return np.ascontiguousarray(k.T[:, :, None, None])


class StateDictReader:
    """Consumes a PyTorch state dict key by key, checking shapes.

    `prefix` is prepended to every key asked for, so the same importer reads a
    module's own state dict or the same module inside a larger checkpoint.
    Errors name the full key, the expected and the found shape.
    """

    def __init__(self, state_dict: Mapping[str, Any], prefix: str = ""):
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
        self._sd = state_dict
        self.prefix = prefix
        self._used: set[str] = set()
        self._missing: list[str] = []

    def scoped(self, prefix: str) -> "StateDictReader":
        """A view of the same state dict with `prefix` appended; shares bookkeeping."""
        child = StateDictReader.__new__(StateDictReader)
        child._sd, child.prefix = self._sd, self.prefix + prefix
        child._used, child._missing = self._used, self._missing
        return child

    def has(self, key: str) -> bool:
        return self.prefix + key in self._sd

    def get(self, key: str, shape: Optional[tuple[int, ...]] = None) -> Optional[np.ndarray]:
        """The array at `prefix + key`, or None (recorded as missing) if absent."""
        full = self.prefix + key
        if full not in self._sd:
            self._missing.append(full)
            return None
        arr = to_numpy(self._sd[full])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"state dict key {full!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        self._used.add(full)
        return arr

    def mark_used(self, keys: Iterable[str]) -> None:
        """Declare keys as consumed without reading them (e.g. counters we ignore)."""
        for k in keys:
            if self.prefix + k in self._sd:
                self._used.add(self.prefix + k)

    @property
    def missing(self) -> list[str]:
        return list(self._missing)

    def unused(self, under: str = "") -> list[str]:
        """Keys under `prefix + under` that no importer consumed."""
        root = self.prefix + under
        return sorted(k for k in self._sd if k.startswith(root) and k not in self._used)

    def finish(self, *, strict: bool = True, under: str = "") -> None:
        """Raise if keys were missing, or (strict) if keys under `under` went unused."""
        problems = []
        if self._missing:
            problems.append(f"missing keys: {_abbrev(self._missing)}")
        extra = self.unused(under)
        if strict and extra:
            problems.append(f"unexpected keys: {_abbrev(extra)}")
        if problems:
            raise ValueError("state dict does not match the model; " + "; ".join(problems))


def _abbrev(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
