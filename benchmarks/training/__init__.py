"""Training dynamics of GFT against SFT, DFT and GRPO on a toy task (``python -m
benchmarks.training``): the paper's claims about training, measured at a CPU scale."""
