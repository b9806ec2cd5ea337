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
#   pip install "verl[vllm]==0.9.1" "gft-kernels[verl]"
#   python integration/examples/verl_gft_prepare_data.py train.jsonl $DATA/train.parquet
#   python integration/examples/verl_gft_prepare_data.py test.jsonl  $DATA/test.parquet --split test
# Then:
#   DATA=$HOME/data/gft NGPUS=8 bash integration/examples/verl_gft_qwen2.5_math_1.5b.sh
# Extra arguments are passed on to verl as Hydra overrides (they win over the ones here).
#
# Settings from the published recipe: the model, the group (1 + 3 + 4), tau, GRPO with
# std normalisation, no KL and no entropy bonus, and a math reward that accepts what the
# published scorer accepts (gft_kernels.integration.rewards: last \boxed{}, "the answer
# is", last number; numeric, percent and symbolic equality through math-verify). Batch sizes, lengths, learning rate and
# epochs below are starting points for 8 x 80 GB GPUs, not published values.
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
    data.max_response_length=3072 \
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
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
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
    trainer.project_name=gft \
    trainer.experiment_name=gft-qwen2.5-math-1.5b-tau${TAU} \
    trainer.logger='["console"]' \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes=1 \
    trainer.total_epochs=3 \
    trainer.save_freq=50 \
    trainer.test_freq=10 \
    "$@"
