"""A session's working directory: made and removed (`workspaces`); its paths checked and
walked without following a link (`paths`); its files listed (`listing`), read (`reading`),
written (`uploads`), removed (`removal`), and compared before and after an execution
(`snapshots`)."""
