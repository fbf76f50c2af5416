"""The control plane on py-libp2p: the only package that imports libp2p.

Everything else talks to peers through what this package exports: ``make_host``, signed DHT records,
gossip topics, reachability and relaying.
"""
