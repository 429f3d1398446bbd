"""Sessions: one per conversation, each a kernel run one execution at a time.

`registry` creates, finds, culls and ends them; `session` runs an execution through its
kernel and records it; `pool` keeps warm kernels for new sessions; `recovery` carries
sessions over to the next service process."""
