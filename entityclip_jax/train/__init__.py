"""The training loop: step, state, optimizer, input stream, validation, several processes."""
