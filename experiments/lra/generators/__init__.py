"""Generators writing data in the released LRA formats (ListOps, Pathfinder) and synthetic stand-ins."""
