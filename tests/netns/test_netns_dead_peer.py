"""A peer that vanishes without a word (power loss: no FIN, no RST) is noticed by a direct channel
within about half a minute, not the kernel's default two hours of keepalive silence.

The two hosts run in a private network namespace made for this test; the loss is made by dropping every
packet of the channel's TCP connection there with iptables (dead_peer.py), so nothing outside the
namespace is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netns_lab import prerequisites_missing, sh

from tensorlink.transport.direct import KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(150)]
SCRIPT = Path(__file__).with_name("dead_peer.py")


def test_a_vanished_peer_breaks_the_channel_within_the_keepalive_bound() -> None:
    missing = prerequisites_missing()
    if missing:
        pytest.fail(missing)
    ns = f"tl-dead-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        sh("ip", "netns", "delete", ns)
    bound = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES
    assert outcome["error"], f"the receive did not fail: {outcome}"
    assert "timed out" in str(outcome["error"]).lower(), outcome
    # The kernel probes on its own timer: allow a few seconds of slack either way, far below two hours.
    assert bound - 5 <= outcome["seconds"] <= bound + 15, (bound, outcome)
