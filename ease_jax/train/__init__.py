"""Training: the mixed objective (`loss`), the optimizer and the pure train step (`step`)."""
