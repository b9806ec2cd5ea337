"""Importing this module makes the fused GFT engine verl's actor engine in this process.

Name it where verl imports plug-ins in its workers::

    actor_rollout_ref.model.external_lib=gft_kernels.integration.verl.use_fused_engine

or ``VERL_USE_EXTERNAL_MODULES=gft_kernels.integration.verl.use_fused_engine`` in the
workers' environment. It registers :class:`~gft_kernels.integration.verl.engine.GFTFSDPEngine`
for the device and vendor verl detects (see
:func:`~gft_kernels.integration.verl.engine.register_fused_engine`); steps whose policy
loss is not ``gft`` still run verl's own path.
"""

from .engine import register_fused_engine

register_fused_engine()
