"""microvmc as an OCI runtime: runc's command line (cli.py), its documents (state.py) and its verbs
on containers that are microVMs (container.py)."""
