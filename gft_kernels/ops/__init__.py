"""Triton kernels. Importing this package imports triton; import it lazily."""
