"""Layer 1, the math: adapter types and algebra, update checks, seeds, faults (torch and the standard library)."""
