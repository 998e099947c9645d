"""Data: synthetic Br35H-layout generator, Br35H reader, site partitioning, splits."""
