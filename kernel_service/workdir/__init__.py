"""A session's working directory: made and removed (`workspaces`), its files listed, read,
written and compared before and after an execution (`files`)."""
