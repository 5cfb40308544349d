#!/usr/bin/env bash
# The recipe as plain commands. Paths, model and GPU count are environment variables.
#
#   bash run.sh demo    offline, on a CPU: a toy corpus and a tiny student made by data.py demo
#   bash run.sh paper   the paper's recipe (SPEC 1-2) on one 8-GPU node (default)
set -euo pipefail
MODE=${1:-paper}

if [ "$MODE" = demo ]; then
    OUT=${OUT:-runs/demo}
    # Toy corpus in the OpenR1-Math-Raw schema: column addition with a teacher that sometimes forgets
    # a carry and is resampled until it is right; held-out problems; a tiny random Qwen2 student.
    python data.py demo --out $OUT
    python data.py prepare --input $OUT/raw.jsonl --tokenizer $OUT/model --out $OUT/data
    # Stage 1 on the correct traces. The tiny student needs a larger LR and batch than the paper's.
    python sft.py --model $OUT/model --data $OUT/data/sft.jsonl --out $OUT/sft \
        --epochs 3 --batch-size 32 --micro-batch-size 8 --lr 2e-3 --save-every 100
    
# Stage 2 from the SFT model: one epoch over D_Pref, 32 pairs per step (1,661 steps), a checkpoint
# every 100 steps (the paper evaluates checkpoints and keeps the best)
torchrun --nproc_per_node $NGPU redi.py --model $OUT/sft/final --data $OUT/data/pref.jsonl --out $OUT/$RUN2 \
    $STAGE2 --grad-checkpointing --save-every 100
    exit 0
fi

# ---- the paper: Qwen2.5-Math-1.5B on OpenR1-Math-Raw, 8 GPUs
OUT=${OUT:-runs/paper}
BASE=${BASE:-Qwen/Qwen2.5-Math-1.5B}
NGPU=${NGPU:-8}
# Stage 2's objective (SPEC 3). The paper's final model is the default; the baselines:
#   STAGE2="--loss redi --alpha 1.0 --lr 1e-6"     symmetric REDI (the paper also ran 2e-7, 1e-7; 1e-6 collapses)
#   STAGE2="--loss dpo --beta 0.001 --lr 2e-7"     DPO, best setting
#   STAGE2="--loss simpo --beta 2 --gamma 1 --lr 5e-7"   SimPO, best setting
STAGE2=${STAGE2:-"--loss redi --alpha 0.8 --lr 1e-6"}
RUN2=${RUN2:-redi}

# D_SFT (77,629 problems) and D_Pref (53,175 triplets) with the authors' selection rules
python data.py prepare --input open-r1/OpenR1-Math-Raw --tokenizer $BASE --out $OUT/data

# Stage 1: SFT, 5 epochs (the paper's final model; 3 epochs is its ablation start point), LR 5e-5,
# batch 128, 32k context after the authors' window override
torchrun --nproc_per_node $NGPU sft.py --model $BASE --data $OUT/data/sft.jsonl --out $OUT/sft \
    --epochs 5 --max-position-embeddings 32768 --rope-theta 300000 --grad-checkpointing

# Stage 2 from the SFT model: one epoch over D_Pref, 32 pairs per step (1,661 steps), a checkpoint
# every 100 steps (the paper evaluates checkpoints and keeps the best)
torchrun --nproc_per_node $NGPU redi.py --model $OUT/sft/final --data $OUT/data/pref.jsonl --out $OUT/$RUN2 \
    $STAGE2 --grad-checkpointing --save-every 100
