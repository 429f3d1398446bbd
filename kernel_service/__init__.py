"""kernel-service: persistent IPython kernels behind HTTP, a code interpreter for LLM agents."""

__version__ = "0.1.0"
