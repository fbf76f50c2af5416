"""The peer node: `python -m tensorlink.node`. CLI, config, the Node composition root, status endpoint."""
