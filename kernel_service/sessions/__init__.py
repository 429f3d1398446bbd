"""Sessions: one per conversation, each a kernel run one execution at a time.

`registry` creates, finds, culls and ends them, handing each the shared services
(`services`); `session` runs an execution as a short pipeline over its `kernel_slot` (the
kernel, and its replacement), its `journal` (the executions in the state store) and its
`image_store`; `pool` keeps warm kernels for new sessions; `recovery` carries sessions over
to the next service process."""
