"""A Mixture-of-Experts policy in GFTGRPOTrainer: the router's load-balancing loss is added
to the GFT loss and logged as ``aux_loss``, as TRL's GRPOTrainer does with its own loss."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gft_kernels.integration.trl import GFTGRPOTrainer
from tests.helpers import TINY_DECODER_LAYERS
from tests.test_integration_trl import chat_tokenizer, config, dataset, right_answer

COEF = 0.5


def tiny_moe(vocab_size: int):
    cfg = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=vocab_size,
        **TINY_DECODER_LAYERS,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


class Checking(GFTGRPOTrainer):
    """Records, per micro-batch: the loss used, the GFT loss alone, and the aux loss of the
    model's own forward on the same inputs."""

    def _compute_loss(self, model, inputs):
        total = super()._compute_loss(model, inputs)
        self.aux_loss_enabled = False
        try:
            plain = super()._compute_loss(model, inputs)
        finally:
            self.aux_loss_enabled = True
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad():
            aux = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        self.seen.append((total.item(), plain.item(), aux.item(), total.requires_grad))
        return total


def test_router_loss_is_added_and_logged(tmp_path):
    tokenizer = chat_tokenizer()
    trainer = Checking(
        model=tiny_moe(len(tokenizer)),
        reward_funcs=[right_answer],
        args=config(tmp_path, router_aux_loss_coef=COEF),
        train_dataset=dataset(),
        processing_class=tokenizer,
    )
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == COEF
    trainer.seen = []
    trainer.train()
    assert trainer.seen
    steps = trainer.args.gradient_accumulation_steps
    for total, plain, aux, with_grad in trainer.seen:
        assert with_grad and aux > 0
        assert abs((total - plain) - COEF * aux / steps) <= 1e-5 * max(1.0, abs(total))
    logged = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    assert logged and all(v > 0 for v in logged)
