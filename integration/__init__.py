"""HF Trainer integration of the GFT loss (importable as ``gft_kernels.integration``).

- :class:`GFTConfig`: ``TrainingArguments`` plus the GFT options.
- :class:`GFTDataCollator`: prompt groups in, padded rows with group advantages out.
- :class:`GFTTrainer`: ``Trainer`` with the fused GFT head and optional self-sampling.

Needs ``transformers`` and ``accelerate`` (``pip install gft-kernels[hf]``). verl users
import :mod:`gft_kernels.integration.verl` (``pip install gft-kernels[verl]``); nothing
here imports verl.
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
