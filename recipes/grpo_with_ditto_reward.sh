#!/usr/bin/env bash
# GRPO rewarded by DITTO, on one 8-GPU node. DITTO turns a handful of demos into a reward,
# r(x, y) = beta * (log pi_ditto(y|x) - log pi_0(y|x)) over the response; `openrlhf-ditto serve-reward` serves it in
# OpenRLHF's remote reward protocol, and OpenRLHF's own train_ppo_ray optimises a policy against it with GRPO
# (group_norm advantages), optionally mixed with a reward model you already serve (MIX=URL=WEIGHT).
#   stage 1: DITTO on the demos (recipes/ditto_1gpu_colocated.sh: SFT warm start, then DITTO)  -> $RUN/ditto
#   stage 2: serve-reward --run $RUN/ditto in the background on GPU $REWARD_GPU, port $PORT
#   stage 3: train_ppo_ray --algo.advantage.estimator group_norm --reward.remote_url on GPUs $GRPO_GPUS
# DRY_RUN=1 checks stage 1 (its flags, model and demos, and its GPU plan) and prints the commands of stages 2 and 3.
# Extra arguments go to train_ppo_ray.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
DEMOS=${DEMOS:-demos.jsonl}  # fewer than 10 demos, one {"prompt", "response"} JSON object a line
PROMPTS=${PROMPTS:-prompts.jsonl}  # GRPO's prompts, one {"prompt"} a line: many, where the demos' style should show
RUN=${RUN:-runs/grpo_with_ditto}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
PORT=${PORT:-5000}
REWARD_GPU=${REWARD_GPU:-7}  # the reward server's GPU: one bf16 copy of the model, its DITTO adapter on and off
GRPO_GPUS=${GRPO_GPUS:-0,1,2,3}  # GRPO's policy, reference and vLLM engines, colocated
MIX=${MIX:-}  # e.g. http://rm-host:5000/get_reward=1.0 (a serve_rm reward model): reward = DITTO's + 1.0 x its

run() {  # run a command; in a dry run print it, shell-quoted
    if [[ "$DRY_RUN" == 1 ]]; then echo "would run: $(printf '%q ' "$@")"; else "$@"; fi
}

# Stage 1: DITTO. A finished run in $RUN/ditto is reused; a dry run checks the DITTO stage without running it.
if [[ "$DRY_RUN" == 1 || ! -d "$RUN/ditto/final" ]]; then
    MODEL="$MODEL" DEMOS="$DEMOS" RUN="$RUN" PYTHON="$PYTHON" DRY_RUN="$DRY_RUN" bash "$HERE/ditto_1gpu_colocated.sh"
fi

# Stage 2: the reward server: the run's final policy against its reference (pi_0) with the run's beta, summed over
# the response tokens. It gathers the one-query requests of concurrent rollouts into batched forwards.
serve=(env CUDA_VISIBLE_DEVICES="$REWARD_GPU" "$PYTHON" -m openrlhf_ditto.cli.main serve-reward
    --run "$RUN/ditto" --host 127.0.0.1 --port "$PORT" --batch_size 32 ${MIX:+--mix "$MIX"})
if [[ "$DRY_RUN" == 1 ]]; then
    run "${serve[@]}"
else
    "${serve[@]}" > "$RUN/reward_server.log" 2>&1 &
    server=$!
    trap 'kill "$server"' EXIT  # the server stops with this script
    until "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2> /dev/null; do
        kill -0 "$server" 2> /dev/null || { cat "$RUN/reward_server.log"; exit 1; }  # it died while loading
        sleep 2
    done
fi

# Stage 3: GRPO from pi_0 (the policy DITTO's reward is measured against): 8 samples per prompt, advantages
# normalised within each prompt's group, KL to the reference as a loss (k3), as OpenRLHF's GRPO examples do.
run env CUDA_VISIBLE_DEVICES="$GRPO_GPUS" "$PYTHON" -m openrlhf.cli.train_ppo_ray \
    --actor.model_name_or_path "$RUN/ditto/reference" \
    --reward.remote_url "http://127.0.0.1:$PORT/get_reward" \
    --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 \
    --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 1e-3 \
    --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template \
    --data.max_len 2048 --rollout.max_new_tokens 1024 --rollout.temperature 1.0 \
    --rollout.batch_size 64 --rollout.micro_batch_size 16 --train.batch_size 128 --train.micro_batch_size 8 \
    --actor.adam.lr 5e-7 --train.max_epochs 1 --train.num_episodes 1 \
    --actor.num_nodes 1 --actor.num_gpus_per_node 4 --ref.num_nodes 1 --ref.num_gpus_per_node 4 \
    --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --train.colocate_all \
    --vllm.enable_sleep --ds.enable_sleep --vllm.gpu_memory_utilization 0.5 \
    --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
    --ckpt.output_dir "$RUN/grpo" --ckpt.save_hf --logger.tensorboard_dir "$RUN/grpo/logs" \
    "$@"
