"""Candidate against original: metrics, the comparison and its record, the cached original side,
speed and memory, and the seed's ``PrecisionValidator``."""
