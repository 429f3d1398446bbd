"""Programs that run outside the service process, each started as a file or a module:

- `zygote`: the fork-server, run as a file; it forks kernels and applies the sandbox
  described in kernel/sandbox_spec.py.
  The standard library and ipykernel only: it must not import this package.
- `startup`: run inside each kernel at its start (output chunking, input() refusal).
- `fonts`: warms matplotlib's font cache in a subprocess before the first kernel.
- `reaper`: a watchdog process that ends the kernels if the service dies; run as a file,
  standard library and psutil only.
- `kernel_bridge`: started in the place of a kernel that speaks only TCP (Deno, IRkernel):
  relays the service's ipc sockets to it. Run as a file; the standard library and pyzmq.
- `bash_kernel_launch`: bash_kernel without pexpect's pause before each line it sends to
  bash. Run as a file; bash_kernel and what it needs.
"""
