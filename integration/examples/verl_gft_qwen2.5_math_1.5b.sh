#!/usr/bin/env bash
# GFT on verl (>= 0.9.1): the published recipe's setting on Qwen2.5-Math-1.5B.
#
# Each prompt's group holds 1 expert + 3 teacher responses (from the dataset, added by the
# gft_hybrid agent loop) and 4 samples of the policy itself; GRPO normalises their rewards
# together; the actor trains with the GFT loss (tau = 0.1) computed by the fused head
# inside verl's FSDP2 actor (no logits; q at temperature 1, log p at the rollout
# temperature; normalised by verl's global token count).
#
# Needs GPUs (vLLM rollout) and:
#   pip install -e ".[verl]" "verl[vllm]==0.9.1"   (in the gft-kernels checkout)
#   python integration/examples/verl_gft_prepare_data.py train.jsonl $DATA/train.parquet
#   python integration/examples/verl_gft_prepare_data.py test.jsonl  $DATA/test.parquet --split test
# Then:
#   DATA=$HOME/data/gft NGPUS=8 bash integration/examples/verl_gft_qwen2.5_math_1.5b.sh
# Extra arguments are passed on to verl as Hydra overrides (they win over the ones here).
#
# Every setting below is the published one (the GFT authors' verl fork, its
# run_qwen2.5-math-1.5B.sh), except where the two engines differ in how they say it:
# - 128 prompts a step, each with 4 dataset responses (1 expert + 3 teacher) and 4 policy
#   samples; the fork asks rollout.n=4 and adds its 4 dataset rows, here rollout.n=8
#   counts both, so ppo_mini_batch_size=32 prompts gives the fork's 256 rows an update
#   and 4 optimizer updates a step;
# - prompts up to 1024 tokens, responses up to 2048; lr 1e-6 constant, no warm-up,
#   weight decay 0.01; micro-batches of 16; 1 epoch; no validation before or during
#   training (the fork's test_freq=5000 never fires);
# - tau 0.1, GRPO advantages with std normalisation, no KL loss or KL reward, no
#   entropy bonus; log p at the rollout temperature, which is 1 here as in the fork;
# - the reward accepts what the fork's NuminaMath scorer accepts (last \boxed{}, "the
#   answer is", last number; numeric, percent and symbolic equality), through
#   gft_kernels.integration.rewards and math-verify.
# GPU count and vLLM memory settings are the machine's, not the recipe's.
# The sampler (GFTReplayBuffer, verl's sync replay buffer) adds per-source metrics to each
# step's log: gft/{self,expert,teacher}/{score/mean,response_length/mean,...}, since verl's
# critic/score/* and response_length/* average the policy's samples with the dataset rows.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-Qwen/Qwen2.5-Math-1.5B}"
DATA="${DATA:-$HOME/data/gft}"
NGPUS="${NGPUS:-8}"
N_SELF=4          # policy samples per prompt
N_DATASET=4       # 1 expert + 3 teacher responses per prompt (from the dataset)
TAU=0.1

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.norm_adv_by_std_in_grpo=true \
    algorithm.use_kl_in_reward=false \
    reward.custom_reward_function.path=pkg://gft_kernels.integration.rewards \
    reward.custom_reward_function.name=compute_score \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=128 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    data.filter_overlong_prompts=true \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=true \
    actor_rollout_ref.model.use_fused_kernels=false \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.model.external_lib=gft_kernels.integration.verl.use_fused_engine \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.policy_loss._target_=gft_kernels.integration.verl.GFTPolicyLossConfig \
    actor_rollout_ref.actor.policy_loss.loss_mode=gft \
    +actor_rollout_ref.actor.policy_loss.tau="$TAU" \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.use_kl_loss=false \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_scheduler_type=constant \
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0 \
    actor_rollout_ref.actor.optim.weight_decay=0.01 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=$((N_SELF + N_DATASET)) \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.calculate_log_probs=false \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$HERE/verl_gft_agent_loop.yaml" \
    actor_rollout_ref.rollout.agent.default_agent_loop=gft_hybrid \
    trainer.v1.sampler.custom_sampler.path=pkg://gft_kernels.integration.verl.metrics \
    trainer.v1.sampler.custom_sampler.name=GFTReplayBuffer \
    trainer.project_name=gft \
    trainer.experiment_name=gft-qwen2.5-math-1.5b-tau${TAU} \
    trainer.logger='["console"]' \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.save_freq=10 \
    trainer.val_before_train=false \
    trainer.test_freq=-1 \
    "$@"
