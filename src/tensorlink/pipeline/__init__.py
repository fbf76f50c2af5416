"""Pipeline, the owner's side: OffloadedModel, the driver and its job, remote autograd and optimizer, LocalSwarm."""
