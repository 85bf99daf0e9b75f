"""Checkpoint -> GGUF (LLM + mmproj) and the laptop run through llama-cpp-python. numpy only: never imports torch."""
