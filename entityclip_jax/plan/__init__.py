"""Plan before renting: compile the training step for a TPU slice or GPU one does not have, and read its memory, FLOPs and speed ceiling."""
