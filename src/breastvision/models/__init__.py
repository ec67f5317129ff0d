"""Model architectures, registered by name, and the model file that carries everything prediction needs."""
