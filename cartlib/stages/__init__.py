"""One module per pipeline stage: `run(...)` does the stage's work and returns what the notebook shows."""
