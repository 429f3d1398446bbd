"""Jupyter's kernel API (what Jupyter Server and Kernel Gateway serve): REST for kernel
specs, kernels and sessions (`rest.py`), and each kernel's WebSocket (`channels.py`),
whose messages a `bridge.KernelConnection` carries to and from the session
(`frames.py`: how they are framed). docs/jupyter.md says how clients plug in."""
