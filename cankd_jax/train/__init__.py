"""The training system: train state, sharded step, optimizer, checkpoints."""
