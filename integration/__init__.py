"""HF Trainer integration of the GFT loss (importable as ``gft_kernels.integration``)."""
