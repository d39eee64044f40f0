#!/usr/bin/env bash
# DITTO (Shaikh et al., arXiv 2406.00888) on OpenRLHF 0.11.2: the paper's Mistral-7B setup on one 8-GPU node.
#   stage 1: SFT warm start on the demos (openrlhf.cli.train_sft, LoRA), merged into a full model (pi_0)
#   stage 2: DITTO from pi_0 with the frozen reference and vLLM rollouts (openrlhf_ditto.cli.train_ditto_ray)
# Override any variable from the environment; extra arguments go to the DITTO command, e.g.
#   MODEL=/models/Mistral-7B-Instruct-v0.2 DEMOS=author_demos.jsonl bash recipes/ditto_mistral7b.sh --logger.wandb.key KEY
# DRY_RUN=1 skips stage 1 and only checks stage 2 (--dry_run: flags, model, demos, resource plan; a Hub MODEL
# needs only its config and tokenizer files for that).
set -euo pipefail

MODEL=${MODEL:-mistralai/Mistral-7B-Instruct-v0.2}  # paper: Mistral 7B Instruct v0.2 (a folder, or a Hub id)
DEMOS=${DEMOS:-demos.jsonl}  # paper: fewer than 10 demos per author, one {"prompt", "response"} JSON object a line
RUN=${RUN:-runs/ditto_mistral7b}  # SFT adapter, pi_0 and the DITTO run folder go here
ACTOR_GPUS=${ACTOR_GPUS:-4}  # policy ranks, each with a reference rank beside it (colocated)
VLLM_ENGINES=${VLLM_ENGINES:-4}  # rollout engines on the node's other GPUs (4 + 4 = 8)
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if [[ "$DRY_RUN" == 1 ]]; then
    SFT_MODEL=${SFT_MODEL:-$MODEL}  # no stage 1 in a dry run: stage 2 is checked against the base model
else
    SFT_MODEL=${SFT_MODEL:-$RUN/sft}
    N_DEMOS=$(grep -c . "$DEMOS")
    # Stage 1, one GPU: all demos in one batch, so one optimiser step per epoch and 30 epochs = at most 30 steps
    # (paper: 30 SFT steps at lr 3e-5; its early stop at demo loss < 1 has no OpenRLHF flag).
    deepspeed --num_gpus 1 --module openrlhf.cli.train_sft \
        --model.model_name_or_path "$MODEL" \
        --data.dataset "$DEMOS" --data.input_key prompt --data.output_key response --data.apply_chat_template \
        --data.max_len 2048 \
        --train.batch_size "$N_DEMOS" --train.micro_batch_size 1 --train.max_epochs 30 \
        --adam.lr 3e-5 --lr_scheduler constant --lr_warmup_ratio 0 \
        --ds.lora.rank 32 --ds.lora.alpha 64 --ds.lora.target_modules q_proj k_proj v_proj o_proj \
        --ds.zero_stage 2 --ds.param_dtype bf16 --model.gradient_checkpointing_enable \
        --ckpt.output_dir "$RUN/sft_lora"  # paper: LoRA r=32, alpha=64 on q, k, v, o
    "$PYTHON" -m openrlhf.cli.lora_combiner --model_path "$MODEL" --lora_path "$RUN/sft_lora" --output_path "$SFT_MODEL"
fi

ditto_args=(
    --actor.model_name_or_path "$SFT_MODEL" --ditto.sft_steps 0  # pi_0 = the SFT model, frozen as the reference
    --data.dataset "$DEMOS" --data.apply_chat_template --data.max_len 2048 --rollout.max_new_tokens 1024
    --ckpt.output_dir "$RUN/ditto"
    # roles: policy + reference colocated on ACTOR_GPUS GPUs, vLLM engines on their own GPUs
    --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS"
    --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" --train.colocate_actor_ref
    --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1
    --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable
    --ds.lora.rank 32 --ds.lora.alpha 64 --ds.lora.target_modules q_proj k_proj v_proj o_proj  # paper: a fresh LoRA
    --rollout.n_samples_per_prompt 10  # paper: M = 10 samples per demo prompt
    # paper: DPO beta 0.05, lr 1e-6. In bf16 a fresh LoRA's update at 1e-6 rounds away in the policy's forward, the
    # sync to vLLM and final/ (benchmarks/bf16_survival.py; README, "bf16: does the update survive?"): 3e-5, about
    # 10x the full-parameter lr as in published LoRA practice, is the lowest lr it measured surviving in all three
    --ditto.beta 0.05 --actor.adam.lr 3e-5
    --ditto.resample_every 10 --ditto.iterations 4  # paper: resample every 10 steps, 40 steps in all
    --train.batch_size 24 --train.micro_batch_size 2  # paper: 8 prompts x 3 = 24 pairs a step (= 4 ranks x 3 x 2)
    --ditto.pair_fractions 0.7 0.2 0.1  # paper: 70% online, 20% replay, 10% inter-model pairs
)
[[ "$DRY_RUN" == 1 ]] && ditto_args+=(--dry_run)
"$PYTHON" -m openrlhf_ditto.cli.train_ditto_ray "${ditto_args[@]}" "$@"
