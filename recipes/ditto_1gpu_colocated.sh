#!/usr/bin/env bash
# DITTO on OpenRLHF 0.11.2 on one GPU: the policy, the frozen reference and a vLLM engine share it. Sleep mode
# moves the policy's optimizer states to the CPU while vLLM samples, and vLLM's weights and KV cache to the CPU while
# the policy trains. Same two stages and paper settings as recipes/ditto_mistral7b.sh, on a smaller default model.
# DRY_RUN=1 skips stage 1 and only checks stage 2; extra arguments go to the DITTO command.
set -euo pipefail

# Memory (README: Memory; DRY_RUN=1 prints the plan): the default model needs a 40 GB GPU or larger (on 80 GB its
# peak is ~46 GB, vLLM's half while it samples; OpenRLHF's fp32 logits of 4 pairs x 2048 tokens alone take 25 GB
# while it trains); on a 24 GB GPU add --train.micro_batch_size 1 (~18 GB). Mistral-7B with LoRA needs 80 GB.
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}  # a folder, or a Hub id
DEMOS=${DEMOS:-demos.jsonl}  # fewer than 10 demos, one {"prompt", "response"} JSON object a line
RUN=${RUN:-runs/ditto_1gpu}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if [[ "$DRY_RUN" == 1 ]]; then
    SFT_MODEL=${SFT_MODEL:-$MODEL}  # no stage 1 in a dry run: stage 2 is checked against the base model
else
    SFT_MODEL=${SFT_MODEL:-$RUN/sft}
    # Stage 1: all demos in one batch, 30 epochs = at most 30 SFT steps at lr 3e-5, LoRA r=32/alpha=64 on q,k,v,o
    deepspeed --num_gpus 1 --module openrlhf.cli.train_sft \
        --model.model_name_or_path "$MODEL" \
        --data.dataset "$DEMOS" --data.input_key prompt --data.output_key response --data.apply_chat_template \
        --train.batch_size "$(grep -c . "$DEMOS")" --train.micro_batch_size 1 --train.max_epochs 30 \
        --adam.lr 3e-5 --lr_scheduler constant --lr_warmup_ratio 0 \
        --ds.lora.rank 32 --ds.lora.alpha 64 --ds.lora.target_modules q_proj k_proj v_proj o_proj \
        --ds.zero_stage 2 --ds.param_dtype bf16 --model.gradient_checkpointing_enable \
        --ckpt.output_dir "$RUN/sft_lora"
    "$PYTHON" -m openrlhf.cli.lora_combiner --model_path "$MODEL" --lora_path "$RUN/sft_lora" --output_path "$SFT_MODEL"
fi

ditto_args=(
    --actor.model_name_or_path "$SFT_MODEL" --ditto.sft_steps 0
    --data.dataset "$DEMOS" --data.apply_chat_template --data.max_len 2048 --rollout.max_new_tokens 1024
    --ckpt.output_dir "$RUN/ditto"
    # one GPU for everything: one placement group, sleep modes on both sides
    --actor.num_nodes 1 --actor.num_gpus_per_node 1 --ref.num_nodes 1 --ref.num_gpus_per_node 1
    --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --train.colocate_all
    --vllm.enable_sleep --ds.enable_sleep --vllm.gpu_memory_utilization 0.5
    --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable
    --ds.lora.rank 32 --ds.lora.alpha 64 --ds.lora.target_modules q_proj k_proj v_proj o_proj
    # paper: lr 1e-6, which bf16 rounds away with LoRA (benchmarks/bf16_survival.py; README, "bf16: does the
    # update survive?"); 3e-5, about 10x the full-parameter lr as in published LoRA practice, survives
    --rollout.n_samples_per_prompt 10 --ditto.beta 0.05 --actor.adam.lr 3e-5
    --ditto.resample_every 10 --ditto.iterations 4
    --train.batch_size 24 --train.micro_batch_size 4  # 24 pairs a step in 6 micro-batches
)
[[ "$DRY_RUN" == 1 ]] && ditto_args+=(--dry_run)
"$PYTHON" -m openrlhf_ditto.cli.train_ditto_ray "${ditto_args[@]}" "$@"
