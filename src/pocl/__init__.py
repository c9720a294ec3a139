"""pocl: white-box knowledge distillation of causal LMs with the POCL curriculum."""

from pocl._version import __version__


def __getattr__(name):  # lazy: `import pocl` stays fast and torch-free until needed
    if name == "DistillConfig":
        from pocl.config import DistillConfig

        return DistillConfig
    if name == "distill":
        from pocl.pipeline import distill

        return distill
    raise AttributeError(f"module 'pocl' has no attribute {name!r}")


__all__ = ["DistillConfig", "distill", "__version__"]
