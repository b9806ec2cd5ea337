"""HF Trainer and TRL integrations of the GFT loss (importable as ``gft_kernels.integration``).

- :class:`GFTConfig`: ``TrainingArguments`` plus the GFT options.
- :class:`GFTDataCollator`: prompt groups in, padded rows with group advantages out.
- :class:`GFTTrainer`: ``Trainer`` with the fused GFT head, step-level normalisation and
  optional self-sampling.
- ``gft_kernels.integration.trl.GFTGRPOTrainer``: TRL's ``GRPOTrainer`` with each prompt's
  demonstrations in its group and the fused GFT loss (needs ``trl``).
- ``gft_kernels.integration.heads``: the lm_head of a (wrapped, sharded) causal LM (torch
  only).
- ``gft_kernels.integration.verl``: the GFT policy loss, fused-head engine and hybrid
  groups for verl (needs ``verl``; nothing else here imports verl).

Needs ``transformers`` and ``accelerate`` (``pip install gft-kernels[hf]``); the head
helpers need only torch.
"""

__all__ = [
    "GFTConfig",
    "GFTDataCollator",
    "GFTTrainer",
    "PromptGroup",
    "Response",
    "SOURCES",
    "SOURCE_CODES",
    "create_model",
    "default_attn_implementation",
]

_LAZY = {
    "GFTConfig": "config",
    "GFTDataCollator": "collator",
    "PromptGroup": "collator",
    "Response": "collator",
    "SOURCES": "collator",
    "SOURCE_CODES": "collator",
    "GFTTrainer": "trainer",
    "create_model": "trainer",
    "default_attn_implementation": "trainer",
}


def __getattr__(name: str):
    # transformers is imported on first use only.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
