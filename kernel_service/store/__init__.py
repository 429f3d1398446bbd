"""What outlives the service process: the SQLite state store (`state`: sessions, executions,
images, kernels), run on a thread of its own (`database`), its `records`, the directory
`locks`, and the history read back from it as a notebook (`history`)."""
