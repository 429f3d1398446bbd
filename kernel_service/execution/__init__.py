"""One execution's outputs, from kernel messages to the result a caller gets.

`collector` turns the kernel's messages into bounded outputs (pure: no I/O); `full_output`
keeps what was cut in a file; `images` finds images in outputs; `results` builds the
`ExecutionResult`; `render` writes its text for a model."""
