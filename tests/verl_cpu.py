"""Run verl 0.9's FSDP actor on CPU, without Ray or a GPU (test helper).

verl ships no CPU platform: :class:`CPUPlatform` is one, registered through verl's own
platform registry and installed with ``set_platform`` before anything asks verl for its
device. :func:`build_actor_engine` then builds a real verl engine (``EngineRegistry.new``,
FSDP2 on gloo) for a tiny Qwen2 saved to a folder, and :func:`make_batch` a mini-batch
in the layout verl's legacy trainer hands its actor (left/right padded, converted with
verl's own ``left_right_2_no_padding``). The same platform also carries verl's whole
``ActorRolloutRefWorker`` (``test_integration_verl_worker.py``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from types import ModuleType
from typing import Any, Dict, Optional

import torch
from verl.plugin.platform import platform_manager
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform


@PlatformRegistry.register(platform="cpu")
class CPUPlatform(PlatformBase):
    """verl's device interface for plain CPU processes (collectives on gloo)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _CPUDeviceModule()

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"  # what tensor.to() takes for this device

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


class _CPUDeviceModule(ModuleType):
    """``torch.cpu`` plus what verl asks its device module for and ``torch.cpu`` lacks.

    Memory queries answer 0 (no device memory to report). The rest is what verl's
    ``ActorRolloutRefWorker`` calls besides: the device name its FLOPs counter looks up
    for the ``mfu`` metric (verl names plain ``torch.cpu`` ``"CPU"`` itself, but this
    module is not ``torch.cpu``), and the device RNG state its checkpoint loader restores
    under the device's name (``"cpu"``): on CPU, torch's default generator.
    """

    def __init__(self) -> None:
        super().__init__("verl_cpu_device")

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"  # the key of verl's FLOPs table for CPUs

    @staticmethod
    def get_rng_state(device: Any = "cpu") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cpu") -> None:
        torch.set_rng_state(new_state)

    def __getattr__(self, name: str) -> Any:
        if name in (
            "max_memory_allocated",
            "max_memory_reserved",
            "memory_allocated",
            "memory_reserved",
        ):
            return lambda *args, **kwargs: 0
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name in ("empty_cache", "reset_peak_memory_stats", "manual_seed", "manual_seed_all"):
            return lambda *args, **kwargs: None
        return getattr(torch.cpu, name)


# verl resolves its platform once, on first use, and some of its modules read the device
# at import time: this module must be imported before them.
if platform_manager._current_platform is None:
    set_platform(CPUPlatform())


def register_default_engine_for_cpu() -> None:
    """verl registers its FSDP language-model engine for cuda and npu only; the same class
    serves CPU (the key is the device verl reports)."""
    from verl.workers.engine import EngineRegistry, FSDPEngineWithLMHead

    registry = EngineRegistry._engines["language_model"]
    if "cpu" not in registry.get("fsdp2", {}):
        EngineRegistry.register(
            model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu"
        )(FSDPEngineWithLMHead)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int = 0, world_size: int = 1, port: Optional[int] = None) -> None:
    """gloo process group from the RANK / WORLD_SIZE / MASTER_* environment verl reads."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or os.environ.get("MASTER_PORT") or free_port()),
    )
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def save_tiny_qwen2(
    path: str, *, tied: bool, vocab: int = 96, seed: int = 0, logit_scale: float = 40.0
) -> None:
    """A 2-layer Qwen2 with random weights, saved as a Hugging Face checkpoint."""
    from transformers import Qwen2Config

    from gft_kernels.integration.examples.train_tiny import random_model
    from tests.helpers import TINY_DECODER_LAYERS

    config = Qwen2Config(
        vocab_size=vocab,
        **TINY_DECODER_LAYERS,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Qwen2ForCausalLM"],
    )
    model = random_model(config, seed)
    with torch.no_grad():  # logits of a useful spread: q on both sides of tau
        model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(path)


def skip_trl_value_head_patch() -> None:
    """verl 0.9.1 patches TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is
    installed, and that class is gone from TRL >= 1.16 (installed here for the TRL
    integration), so verl's FSDP engine fails to build beside it. The patch concerns PPO
    value heads only; the test environment tells verl's module that TRL is absent."""
    from verl.models.transformers import monkey_patch

    monkey_patch.is_trl_available = lambda: False


def build_actor_engine(
    model_path: str,
    *,
    lr: float = 0.1,
    use_remove_padding: bool = True,
    external_lib: Optional[str] = None,
):
    """A verl ``language_model`` engine for the actor (FSDP2, fp32, SGD), initialised.

    Returns ``(engine, model_config)``.
    """
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    register_default_engine_for_cpu()
    model_config = HFModelConfig(
        path=model_path,
        load_tokenizer=False,
        external_lib=external_lib,
        override_config={"attn_implementation": "sdpa"},
        use_remove_padding=use_remove_padding,
        enable_gradient_checkpointing=False,
    )
    engine_config = FSDPEngineConfig(
        strategy="fsdp2",
        model_dtype="fp32",
        use_torch_compile=False,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
    )
    object.__setattr__(engine_config, "use_remove_padding", use_remove_padding)
    optimizer_config = FSDPOptimizerConfig(
        optimizer="SGD",
        lr=lr,
        weight_decay=0.0,
        clip_grad=1e9,
        total_training_steps=1,
    )
    from verl.trainer.config import CheckpointConfig

    skip_trl_value_head_patch()
    engine = EngineRegistry.new(
        model_type="language_model",
        backend="fsdp2",
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine, model_config


def make_batch(
    prompts: list,
    responses: list,
    advantages: torch.Tensor,
    *,
    prompt_width: int,
    response_width: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    old_log_probs: Optional[torch.Tensor] = None,
    extra: Optional[Dict[str, Any]] = None,
):
    """A left-padded prompt / right-padded response mini-batch, as verl's trainer builds
    it, converted to verl's no-padding layout by verl itself.

    ``advantages`` is ``(B,)`` (broadcast over the response tokens, as GRPO gives) or
    ``(B, response_width)``.
    """
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch = len(prompts)
    prompt_ids = torch.full((batch, prompt_width), pad_id, dtype=torch.long)
    response_ids = torch.full((batch, response_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(batch, prompt_width, dtype=torch.long)
    response_mask = torch.zeros(batch, response_width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_ids[i, prompt_width - len(p) :] = torch.tensor(p)
        prompt_mask[i, prompt_width - len(p) :] = 1
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(-1, response_width)
    advantages = (advantages * response_mask).float()
    if old_log_probs is None:
        old_log_probs = torch.zeros(batch, response_width)
    fields = {
        "prompts": prompt_ids,
        "responses": response_ids,
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "advantages": advantages,
        "old_log_probs": old_log_probs.float(),
    }
    td = TensorDict(fields, batch_size=batch)
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=temperature, **(extra or {}))
    return td


def whole_batch_agg_loss(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl's own ``agg_loss`` of ``values (B, T)`` over one whole mini-batch on one rank:
    the token and sequence counts are those of ``mask`` (the references' aggregation)."""
    from verl.trainer.ppo.core_algos import agg_loss

    return agg_loss(
        values,
        mask,
        mode,
        dp_size=1,
        batch_num_tokens=int(mask.sum()),
        global_batch_size=mask.shape[0],
    )


def make_nested_batch(
    prompts: list,
    responses: list,
    advantages: torch.Tensor,
    *,
    temperature: float = 1.0,
    old_log_probs: Optional[torch.Tensor] = None,
    extra: Optional[Dict[str, Any]] = None,
):
    """The same mini-batch in the layout verl's V1 trainer hands its actor: one record per
    rollout (no padding anywhere), stacked by verl's own ``list_of_dict_to_tensordict`` into
    nested tensors. ``advantages`` is ``(B,)``; ``old_log_probs`` ``(B, >= max length)``."""
    from verl.utils import tensordict_utils as tu

    records = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt, response = torch.tensor(p), torch.tensor(r)
        ids = torch.cat([prompt, response])
        old = torch.zeros(len(r)) if old_log_probs is None else old_log_probs[i, : len(r)]
        records.append(
            {
                "prompts": prompt,
                "responses": response,
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "position_ids": torch.arange(len(ids)),
                "response_mask": torch.ones_like(response),
                "loss_mask": torch.ones_like(response),
                "advantages": torch.full((len(r),), float(advantages[i])),
                "old_log_probs": old.float(),
            }
        )
    td = tu.list_of_dict_to_tensordict(records)
    tu.assign_non_tensor(td, temperature=temperature, **(extra or {}))
    return td
