"""Generators writing the released LRA formats (ListOps, Pathfinder), and synthetic stand-ins."""
