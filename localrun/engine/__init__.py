"""The engine in the model process: the scheduler that decodes many requests together (continuous batching)."""
