"""Training, quantization and evaluation of the lane and flow models (needs torch)."""
