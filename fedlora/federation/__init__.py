"""Layer 3, the federation without Flower: the round loop, its transports and the wire codec."""
