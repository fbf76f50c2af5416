"""The control plane on py-libp2p: the only package that imports libp2p.

Everything else talks to peers through what this package exports: ``PeerHost`` (peer_host.py: connect,
open and serve streams, addresses, by peer id strings) with ``Stream`` (streams.py), signed DHT records
(dht.py, records.py), gossip topics, reachability, relaying and the live-peer ``Roster`` (roster.py).
Every patch of py-libp2p and every use of its private members lives in ``_libp2p.py``, which lists them;
tests/p2p/test_libp2p_canary.py checks that list against the installed library.
"""
