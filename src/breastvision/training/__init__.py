"""Training: one engine for CPU, GPU and several processes, frozen-feature caching, staged transfer learning."""
