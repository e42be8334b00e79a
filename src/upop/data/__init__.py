"""Data: the built-in procedural shapes world and readers for real formats."""
