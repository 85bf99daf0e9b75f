"""Side-by-side programs users run: mote-bench (and its random-weight checkpoints), the training-step
benchmark, the GGUF parity/real-shape report. They print ratios measured in one run, never timed tests."""
