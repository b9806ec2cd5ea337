"""The published GFT recipe for verl, checked without GPUs.

The launch script runs with a stand-in ``python3`` that records its arguments; they must
form a configuration verl accepts (its own Hydra schema, its ``validate_config``), with
the GFT pieces in place. The data-preparation script's rows must be what verl's dataset
and the hybrid agent loop read.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import pandas as pd
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from gft_kernels.integration.verl import GFTPolicyLossConfig
from gft_kernels.integration.verl.hybrid import dataset_responses

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "integration" / "examples"
SCRIPT = EXAMPLES / "verl_gft_qwen2.5_math_1.5b.sh"


def launch_arguments(tmp_path, *extra):
    """The arguments the launch script hands to ``python3``."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ,
        PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        DATA="/data/gft",
        NGPUS="8",
    )
    out = subprocess.run(
        ["bash", str(SCRIPT), *extra], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout)


def test_launch_script_is_a_valid_verl_gft_configuration(tmp_path):
    args = launch_arguments(tmp_path, "trainer.total_epochs=1")
    assert args[:2] == ["-m", "verl.trainer.main_ppo"]
    overrides = args[2:]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    assert not need_reference_policy(config) and not need_critic(config)
    assert config.trainer.total_epochs == 1  # extra arguments win
    rollout = config.actor_rollout_ref.rollout
    assert rollout.n == 8 and rollout.calculate_log_probs is False  # 1 + 3 + 4 per prompt
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-1.5B"
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, GFTPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "gft" and actor.policy_loss.tau == 0.1
    assert actor.entropy_coeff == 0 and not actor.use_kl_loss
    # The agent loop file names the hybrid loop by a path verl can instantiate.
    (entry,) = OmegaConf.load(rollout.agent.agent_loop_config_path)
    assert entry.name == rollout.agent.default_agent_loop == "gft_hybrid"
    module, _, name = entry._target_.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name).__name__ == name
    assert config.actor_rollout_ref.model.external_lib == (
        "gft_kernels.integration.verl.use_fused_engine"
    )


# The published run (the GFT authors' verl fork, run_qwen2.5-math-1.5B.sh): each setting,
# the fork's value, and where verl 0.9.1 holds it once the script's overrides are applied.
PUBLISHED = [
    ("train prompts a step", 128, lambda c: c.data.train_batch_size),
    ("prompt length", 1024, lambda c: c.data.max_prompt_length),
    ("response length", 2048, lambda c: c.data.max_response_length),
    ("learning rate", 1e-6, lambda c: c.actor_rollout_ref.actor.optim.lr),
    ("lr schedule", "constant", lambda c: c.actor_rollout_ref.actor.optim.lr_scheduler_type),
    ("warm-up", 0, lambda c: c.actor_rollout_ref.actor.optim.lr_warmup_steps_ratio),
    ("weight decay", 0.01, lambda c: c.actor_rollout_ref.actor.optim.weight_decay),
    ("micro-batch per GPU", 16, lambda c: c.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu),
    ("epochs", 1, lambda c: c.trainer.total_epochs),
    ("validation before training", False, lambda c: c.trainer.val_before_train),
    ("tau", 0.1, lambda c: c.actor_rollout_ref.actor.policy_loss.tau),
    ("KL loss", False, lambda c: c.actor_rollout_ref.actor.use_kl_loss),
    ("KL in reward", False, lambda c: c.algorithm.use_kl_in_reward),
    ("entropy bonus", 0, lambda c: c.actor_rollout_ref.actor.entropy_coeff),
    ("advantage", "grpo", lambda c: c.algorithm.adv_estimator),
    ("std-normalised advantage", True, lambda c: c.algorithm.norm_adv_by_std_in_grpo),
    ("rollout temperature", 1.0, lambda c: c.actor_rollout_ref.rollout.temperature),
]
FORK_SELF_SAMPLES, FORK_DATASET_ROWS, FORK_MINI_BATCH_PROMPTS = 4, 4, 64


def test_launch_script_uses_the_published_settings(tmp_path):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=launch_arguments(tmp_path)[2:])
    OmegaConf.resolve(config)
    wrong = {name: (fork, get(config)) for name, fork, get in PUBLISHED if get(config) != fork}
    assert not wrong, f"setting: (fork's value, the script's) {wrong}"
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    # The fork adds its dataset rows to rollout.n samples; here rollout.n counts both.
    assert rollout.n == FORK_SELF_SAMPLES + FORK_DATASET_ROWS
    rows_a_step = config.data.train_batch_size * rollout.n
    rows_an_update = actor.ppo_mini_batch_size * rollout.n
    assert rows_an_update == FORK_MINI_BATCH_PROMPTS * FORK_SELF_SAMPLES  # 256
    assert rows_a_step // rows_an_update == 4  # optimizer updates a step, as in the fork
    assert config.trainer.test_freq <= 0  # the fork's 5000 never fires within one epoch
    reward = config.reward.custom_reward_function
    assert (reward.path, reward.name) == ("pkg://gft_kernels.integration.rewards", "compute_score")


def test_the_verl_extra_holds_what_main_ppo_imports_to_start(tmp_path):
    """verl's main_ppo runs its v1 trainer by default (``trainer.use_v1``), which imports
    TransferQueue; verl leaves that package to its heavy verl-core extra."""
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=launch_arguments(tmp_path)[2:])
    assert config.trainer.use_v1
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ, get_trainer_cls

    assert get_trainer_cls(config.trainer.v1.trainer_mode) is not None
    assert AgentLoopManagerTQ.__name__ == "AgentLoopManagerTQ"


def test_prepare_data_rows_feed_the_hybrid_loop(tmp_path):
    src = tmp_path / "train.jsonl"
    examples = [
        {
            "question": "1+1?",
            "answer": "2",
            "expert": "\\boxed{2}",
            "teachers": ["t1", "t2", "t3", "t4"],
        },
        {"question": "2+3?", "answer": "5", "expert": "\\boxed{5}", "teachers": ["t"]},
    ]
    src.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    dst = tmp_path / "train.parquet"
    subprocess.run(
        [sys.executable, str(EXAMPLES / "verl_gft_prepare_data.py"), str(src), str(dst)],
        check=True,
        capture_output=True,
    )
    rows = pd.read_parquet(dst).to_dict("records")
    assert len(rows) == 2
    first = dataset_responses(rows[0])  # parquet hands back numpy arrays: still read
    assert [r["source"] for r in first] == ["expert", "teacher", "teacher", "teacher"]
    assert [r["text"] for r in first] == ["\\boxed{2}", "t1", "t2", "t3"]
    assert rows[1]["reward_model"]["ground_truth"] == "5"
    assert list(rows[1]["prompt"])[0]["role"] == "user"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "verl_gft_prepare_data.py"),
            str(bad),
            str(tmp_path / "bad.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "'expert'" in out.stderr
