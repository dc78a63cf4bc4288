"""Where arrays live: the device mesh and the sharding rules of parameters and batches."""
