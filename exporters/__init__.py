"""Torch-free writers: the checkpoint reader, ternary packing, GGUF (LLM + mmproj), the memory planner and
budget search. Exporters write files; they do not run them (runtime_cpu does)."""
