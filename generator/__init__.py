"""The generator service: turns hypotheses and refine requests into variants to benchmark."""
