"""Detection passes: each takes a recorded graph and returns one fact about the MoE block."""
