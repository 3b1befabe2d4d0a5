"""Prediction: onto the network grid, sliding windows and their blending, back onto the input grid, post-processing."""
