"""Static checks of the Triton kernels (``make aot``): compile every variant the library can
launch for several GPU architectures without a GPU and read what the compiler made of it.

:mod:`.aot` (CLI), :mod:`.variants` (what to compile), :mod:`.records` (the records),
:mod:`.worker` (compiling and reading kernels), :mod:`.report` (gate, tables) and
:mod:`.sass` (ptxas report, SASS loops).
"""
