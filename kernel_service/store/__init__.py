"""What outlives the service process: the SQLite state store (`state`: sessions, executions,
images, kernels) and the history read back from it as a notebook (`history`)."""
