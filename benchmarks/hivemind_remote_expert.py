"""hivemind's RemoteExpert at batch 1: the remote call benchmarks/inference.py compares TensorLink's with.

Runs under the hivemind virtual environment (``make bench`` creates ``.venv-hivemind`` with hivemind==1.1.12;
hivemind is never installed into the project's .venv), started by benchmarks/inference.py as a subprocess;
prints one JSON object on stdout:

    .venv-hivemind/bin/python benchmarks/hivemind_remote_expert.py --calls 200 --warmup 20

A hivemind ``Server`` with one "ffn" expert (hivemind's FeedforwardBlock, hidden size 1024: Linear 1024->4096,
gelu, Linear 4096->1024, residual LayerNorm) runs in a background process on 127.0.0.1 (``background_server``,
as hivemind's own tests do); this process joins its DHT and calls the expert through ``RemoteExpert`` on a
(1, 1024) float32 input under ``torch.no_grad()``. The local baseline is the same block (same weights seed) in
this process. Both the server and this process run torch with one thread. The times are per call, in ms:
the median of ``--calls`` calls after ``--warmup`` (the first call also fetches the expert's schema).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the server process, before torch starts

import torch  # noqa: E402

HIDDEN = 1024
UID = "expert.0"


def timed_ms(fn: object, x: torch.Tensor, calls: int, warmup: int) -> list[float]:
    times = []
    with torch.no_grad():
        for i in range(warmup + calls):
            start = time.perf_counter()
            fn(x)  # type: ignore[operator]
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import hivemind
    from hivemind.moe.client.expert import create_remote_experts
    from hivemind.moe.expert_uid import ExpertInfo
    from hivemind.moe.server import background_server
    from hivemind.moe.server.layers.common import FeedforwardBlock

    torch.manual_seed(0)
    local = FeedforwardBlock(HIDDEN).eval()
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1))
    with background_server(
        expert_uids=[UID],
        expert_cls="ffn",
        hidden_dim=HIDDEN,
        num_handlers=1,
        optim_cls=None,
        device="cpu",
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    ) as server:
        dht = hivemind.DHT(initial_peers=server.addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        try:
            (expert,) = create_remote_experts([ExpertInfo(uid=UID, peer_id=server.peer_id)], dht=dht)
            assert expert is not None
            remote = timed_ms(expert, x, args.calls, args.warmup)
            baseline = timed_ms(local, x, args.calls, args.warmup)
        finally:
            dht.shutdown()
    remote_ms, local_ms = statistics.median(remote), statistics.median(baseline)
    print(
        json.dumps(
            {
                "hivemind_version": hivemind.__version__,
                "torch_version": torch.__version__,
                "calls": args.calls,
                "remote_ms": remote_ms,
                "local_ms": local_ms,
                "overhead_ms": remote_ms - local_ms,
                "remote_ms_p10_p90": [statistics.quantiles(remote, n=10)[0], statistics.quantiles(remote, n=10)[-1]],
            }
        )
    )


if __name__ == "__main__":
    main()
