"""The detector service: change detection over kernel.stats, and the hypothesis stage."""
