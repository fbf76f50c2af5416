"""Every libp2p protocol id and gossip topic name of TensorLink, in one place.

An id names the format spoken on a stream; a new, incompatible format gets a new version, never the old id.
Keeping them together lets a reader see the whole surface a node serves and keeps two services from
claiming one id.
"""

# Streams.
DIALBACK_PROTOCOL = "/tensorlink/dialback/1.0.0"  # reachability: a peer asks us to dial its addresses back
DIALBACK_PROBE_PROTOCOL = "/tensorlink/dialback-probe/1.0.0"  # reachability: the dial-back itself, a probe
CHANNEL_PROTOCOL = "/tensorlink/channel/1.0.0"  # transport: set-up of a direct tensor channel between peers
STAGE_PROTOCOL = "/tensorlink/stage/1.0.0"  # owner -> worker: stage IR and weights, then the stage's run
ASSIGN_PROTOCOL = "/tensorlink/assign/1.0.0"  # validator -> worker: one StageAssign, one answer
CHALLENGE_PROTOCOL = "/tensorlink/challenge/1.0.0"  # validator -> worker: a capacity challenge and its answer
JOB_PROTOCOL = "/tensorlink/job/1.0.0"  # owner -> validator: one JobRequest, answered by a JobPlan or an error
PROOF_PROTOCOL = "/tensorlink/validator-proof/1.0.0"  # any peer -> validator: its signed stake proof
BENCH_TRANSPORT_PROTOCOL = "/tensorlink/bench-transport/1.0.0"  # benchmarks/transport.py only: raw stream baseline

# Gossip topics.
HEARTBEAT_TOPIC = "/tensorlink/heartbeat/1"  # every node's signed heartbeat: role, liveness and load
JOBS_TOPIC = "/tensorlink/jobs/1"  # validators' signed job records (admitted, running, done/failed)
