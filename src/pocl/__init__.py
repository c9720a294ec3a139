"""pocl: white-box knowledge distillation of causal LMs with the POCL curriculum."""

__version__ = "0.1.0"
