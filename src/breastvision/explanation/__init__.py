"""Explanations: Grad-CAM heat-maps for CNNs, ViTs and the fusion model."""
