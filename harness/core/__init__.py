"""The bottom layer: models, decode primitives, prompts, records and metrics; imports nothing above it."""
