"""Capture a block forward as an fx graph (concrete op recording) and make example inputs."""
