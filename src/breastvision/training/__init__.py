"""Training: one engine for CPU, GPU and several processes, frozen-feature cache, staged transfer."""
