"""The package version, in a module of its own so that any pocl module can read it without importing
``pocl/__init__`` (which lazily reaches pocl.pipeline and would close an import cycle)."""

__version__ = "0.1.0"
