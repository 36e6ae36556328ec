"""Converters from other libraries' RetinaNet weights to our checkpoints."""
