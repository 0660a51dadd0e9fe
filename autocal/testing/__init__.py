"""Test helpers: toy MoE blocks, the model zoo, hypothesis strategies and assertions."""
