"""The model: base and quantization, adapters (one entry per method), loss kernels, 4-bit layers."""
