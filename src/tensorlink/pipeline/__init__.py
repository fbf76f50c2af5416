"""Pipeline: partitioner, micro-batch schedules, remote autograd, OffloadedModel, LocalSwarm."""
