"""The GPU path (torch + Triton, CUDA C where it wins): fused ternary quantisation and int8 GEMMs for
training, W2A8 GEMV/GEMM and grouped experts for inference, the GPU engine (DESIGN.md section 6)."""
