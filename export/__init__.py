"""Export side of neodragon-jax: the PyTorch mirror and JAX <-> PyTorch / official-folder conversion.

May import torch (``neodragon_jax`` never imports this package).
"""
