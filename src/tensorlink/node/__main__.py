"""`python -m tensorlink.node`: see cli.py."""

import logging
import os
import sys

from tensorlink.node.cli import main

code = main()
# Everything is stopped and flushed by now. Skipping interpreter finalisation (module teardown of torch
# and libp2p takes over a second) keeps the promise that SIGINT/SIGTERM stop the node within 2 s.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
