"""The node side: the runtime that serves client sessions (``runtime``), its
TCP service (``server``), the zygote that forks workers (``zygote``), the
blocking worker loop (``worker``) and the dispy job environment (``env``)."""
