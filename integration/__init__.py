"""HF Trainer and TRL integrations of the GFT loss (importable as ``gft_kernels.integration``).

- :class:`GFTConfig`: ``TrainingArguments`` plus the GFT options.
- :class:`GFTDataCollator`: prompt groups in, padded rows with group advantages out.
- :class:`GFTTrainer`: ``Trainer`` with the fused GFT head, step-level normalisation and
  optional self-sampling.
- ``gft_kernels.integration.trl.GFTGRPOTrainer``: TRL's ``GRPOTrainer`` with each prompt's
  demonstrations in its group and the fused GFT loss (needs ``trl``).
- ``gft_kernels.integration.heads``: the lm_head of a (wrapped, sharded) causal LM (torch
  only).
- :func:`verl_policy_loss` / :func:`verl_policy_loss_with_metrics`: the GFT policy loss in
  verl's policy-loss calling convention (no verl import).

Needs ``transformers`` and ``accelerate`` (``pip install gft-kernels[hf]``); the verl loss
and the head helpers need only torch.
"""

from .verl import verl_policy_loss, verl_policy_loss_with_metrics

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
    "verl_policy_loss",
    "verl_policy_loss_with_metrics",
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
    # transformers is imported on first use only: verl users need torch alone.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
