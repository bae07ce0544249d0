"""cankd_jax: CanKD knowledge distillation (WACV 2026) and its baselines in JAX/Flax."""

__version__ = "0.1.0"
