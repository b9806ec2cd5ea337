"""The test suite of gft_kernels (a package, so that its helper modules import as
``tests.<name>`` in worker processes as well)."""
