#!/usr/bin/env bash
# The recipe as plain commands. Paths, model and GPU count are environment variables.
#
#   bash run.sh demo    offline, on a CPU: a toy corpus and a tiny student made by demo.py
#                       (sizes by environment variables: PROBLEMS, TEST, SFT_EPOCHS, SAMPLES, SFT_SEEDS, SEEDS;
#                       more stage-2 runs: EXTRA_STAGE2="NAME FLAGS; NAME FLAGS", e.g. "g_suffix --loss redi_suffix
#                       --lr 6e-5")
#   bash run.sh paper   the paper's recipe (PAPER.md §1-2) on one 8-GPU node (default)
set -euo pipefail
MODE=${1:-paper}

if [ "$MODE" = demo ]; then
    # ---- the demo: the same pipeline offline on a CPU, ~7 minutes on 2 cores (README). A step whose output is
    # already there (the data, a finished run, an evaluated checkpoint) is skipped, so seeds can be added to the
    # same OUT: `make demo-seeds` (SFT_SEEDS="0 1 2" SEEDS="0 1") makes the README's multi-seed table.
    OUT=${OUT:-runs/demo}
    PROBLEMS=${PROBLEMS:-2000}     # training problems: ~500 become pairs
    TEST=${TEST:-400}              # held-out problems
    SFT_EPOCHS=${SFT_EPOCHS:-20}   # the plateau is reached by 3/4 of them in every SFT seed tried (README)
    SAMPLES=${SAMPLES:-4}          # samples per test problem (PAPER.md §4's intermediate evals)
    SFT_SEEDS=${SFT_SEEDS-0}       # SFT data order (and its evaluation's sampling); e.g. SFT_SEEDS="0 1 2"
    SEEDS=${SEEDS-0}               # stage-2 data order and eval sampling; e.g. SEEDS="0 1"; SEEDS="": SFT only
    SFT_LR=3e-3                    # a tiny model trained from scratch needs a large LR
    LR=6e-5                        # stage 2: SFT's LR / 50, as the paper's 1e-6 after 5e-5
    HIGH_LR=3e-4                   # 5 x LR: the paper ran symmetric REDI at 1e-6 (collapsed) and 5x lower
    # One thread: on a 2-core machine with another job running, torch's default two threads took ~5 s per SFT
    # step against ~0.1 s for one (README, Time)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

    # Toy corpus in the OpenR1-Math-Raw schema: 3-digit column addition. The teacher sometimes misreads a digit,
    # forgets a carry, mis-adds or miscopies, and is resampled until right; a tiny random Qwen2 student (hidden 64,
    # 2 layers) with a BPE tokenizer learnt from the corpus.
    if [ ! -f $OUT/data/pref.jsonl ]; then
        python demo.py --out $OUT --problems $PROBLEMS --test-problems $TEST --digits 3 --hidden-size 64
        python data.py prepare --input $OUT/raw.jsonl --tokenizer $OUT/model --out $OUT/data
    fi

    # Evaluate every checkpoint of a run that is not evaluated yet: RUN/eval/step_N (traces are ~50 tokens)
    evaluate() {
        for CKPT in $1/ckpt/step_*; do
            [ -f $1/eval/$(basename $CKPT)/summary.json ] || \
                python eval.py --model $CKPT --data $OUT/test.jsonl --samples $SAMPLES --seed $2 \
                    --max-new-tokens 80 --batch-size 400 --out $1/eval/$(basename $CKPT)
        done
    }
    RUNS=()
    for SFT_SEED in $SFT_SEEDS; do
        # Stage 1: SFT on the correct traces, 16 sequences per step, checkpoints at 3/4 and at the end to show
        # the plateau
        SFT=$OUT/sft_seed$SFT_SEED/sft
        STEPS=$(( $(wc -l < $OUT/data/sft.jsonl) / 16 * SFT_EPOCHS ))
        [ -e $SFT/final ] || \
            python sft.py --model $OUT/model --data $OUT/data/sft.jsonl --out $SFT --epochs $SFT_EPOCHS \
                --batch-size 16 --micro-batch-size 16 --lr $SFT_LR --seed $SFT_SEED --save-every $(( STEPS * 3 / 4 )) \
                --resume
        evaluate $SFT $SFT_SEED
        RUNS+=($SFT)

        # Stage 2 from the same SFT checkpoint, one pass over the pairs, equal step budgets, a checkpoint halfway.
        # DPO's beta is the paper's 0.001 scaled by its trace length over the toy's (~5,000 / ~50 tokens), as its
        # margin is a sum over tokens; SimPO's is length-normalised, so it stays 2 (gamma 1). The stage-2 LRs of
        # DPO and SimPO keep their ratio to REDI's in the paper (2e-7 and 5e-7 to 1e-6).
        HALF=$(( ($(wc -l < $OUT/data/pref.jsonl) / 32 + 1) / 2 ))
        for SEED in $SEEDS; do
            S=$OUT/sft_seed$SFT_SEED/stage2_seed$SEED
            stage2() {
                [ -e $S/$1/final ] || \
                    python redi.py --model $SFT/final --data $OUT/data/pref.jsonl --out $S/$1 --batch-size 32 \
                        --micro-batch-size 32 --seed $SEED --save-every $HALF --resume "${@:2}"
                evaluate $S/$1 $SEED
                RUNS+=($S/$1)
            }
            stage2 a_sft       --loss redi --alpha 0.0 --lr $LR          # continued SFT on the chosen traces
            stage2 b_redi      --loss redi --alpha 0.8 --lr $LR          # REDI
            stage2 c_sym_high  --loss redi --alpha 1.0 --lr $HIGH_LR     # symmetric REDI, high LR
            stage2 d_redi_high --loss redi --alpha 0.8 --lr $HIGH_LR     # REDI, the same high LR
            stage2 e_dpo       --loss dpo --beta 0.1 --lr 1.2e-5         # DPO
            stage2 f_simpo     --loss simpo --beta 2 --gamma 1 --lr 3e-5 # SimPO
            # More stage-2 runs without editing this file: EXTRA_STAGE2 holds runs separated by ";", each a name
            # (its folder) then redi.py flags, e.g. EXTRA_STAGE2="g_suffix --loss redi_suffix --lr 6e-5" (REDI's LR)
            IFS=';' read -ra EXTRA <<< "${EXTRA_STAGE2:-}"
            for RUN in "${EXTRA[@]}"; do
                read -ra WORDS <<< "$RUN"
                [ ${#WORDS[@]} -gt 0 ] || continue
                if [[ ${WORDS[0]} == -* ]]; then
                    echo "EXTRA_STAGE2: each run starts with its name, then redi.py flags; got '$RUN'" >&2
                    exit 2
                fi
                stage2 "${WORDS[@]}"
            done
        done
    done

    # One table (pass@1 +- SEM, pass@k, LogPS, update norm, collapse), the runs pooled over seeds (mean and spread
    # over SFT seeds and stage-2 seeds), and plots like the paper's Figure 6
    python eval.py report "${RUNS[@]}" --out $OUT
    exit 0
fi

# ---- the paper: Qwen2.5-Math-1.5B on OpenR1-Math-Raw, 8 GPUs. A step whose output is already there
# (the data, a finished SFT or stage-2 run) is skipped, and an interrupted run resumes, so the baselines
# can be run one after another into the same OUT.
OUT=${OUT:-runs/paper}
BASE=${BASE:-Qwen/Qwen2.5-Math-1.5B}
NGPU=${NGPU:-8}
# Which run to make (PAPER.md §2-3). The default is the paper's final model: REDI from SFT-5ep. The paper's
# baselines and ablations start from SFT-3ep, a 3-epoch run with its own schedule (the 5-epoch run's
# checkpoint after 3 epochs is not it: its LR has not decayed to 0 there). For example:
#   SFT_EPOCHS=3 RUN2=redi                                                    REDI alpha 0.8, to compare with:
#   SFT_EPOCHS=3 RUN2=sym_redi STAGE2="--loss redi --alpha 1.0 --lr 1e-6"     symmetric REDI (collapses at 1e-6;
#                                                                             the paper also ran 2e-7 and 1e-7)
#   SFT_EPOCHS=3 RUN2=dpo STAGE2="--loss dpo --beta 0.001 --lr 2e-7"          DPO, best setting
#   SFT_EPOCHS=3 RUN2=simpo STAGE2="--loss simpo --beta 2 --gamma 1 --lr 5e-7"   SimPO, best setting
SFT_EPOCHS=${SFT_EPOCHS:-5}
STAGE2=${STAGE2:-"--loss redi --alpha 0.8 --lr 1e-6"}
RUN2=${RUN2:-redi}
# Sequences per forward (packed end to end in one row): a GPU step pays a fixed host cost per forward (~0.1-0.2 s
# at 1.5B on an H100: 28 checkpointed, sharded layers launched op by op), so a rank's 16 SFT sequences go as 4 rows
# of 4 and its 4 stage-2 pairs as 2 rows of 2. The loss is normalised by the step's token or pair count, so the
# numbers are those of one sequence per forward (tests/test_sft.py, tests/test_redi.py); lower these if a row of
# the longest traces runs out of memory
SFT_MICRO=${SFT_MICRO:-4}
PAIR_MICRO=${PAIR_MICRO:-2}
# Final-evaluation prompt: lighteval = the authors' user template and their edited generation prompt
# '<|im_start|>assistant<think>\n', which the paper's tables come from (PAPER.md §4); bare = the training prompt
PROMPT=${PROMPT:-lighteval}
SFT=$OUT/sft_${SFT_EPOCHS}ep     # e.g. runs/paper/sft_5ep
S2=$OUT/sft_${SFT_EPOCHS}ep-$RUN2   # e.g. runs/paper/sft_5ep-redi

# D_SFT (77,629 problems) and D_Pref (53,175 triplets) with the authors' selection rules and length count
[ -f $OUT/data/pref.jsonl ] || \
    python data.py prepare --input open-r1/OpenR1-Math-Raw --tokenizer $BASE --out $OUT/data

# Stage 1: SFT for SFT_EPOCHS epochs, LR 5e-5, batch 128, 32k context after the authors' window override
[ -e $SFT/final ] || \
    torchrun --nproc_per_node $NGPU sft.py --model $BASE --data $OUT/data/sft.jsonl --out $SFT \
        --epochs $SFT_EPOCHS --max-position-embeddings 32768 --rope-theta 300000 --grad-checkpointing \
        --micro-batch-size $SFT_MICRO --resume

# Stage 2 from that SFT model: one epoch over D_Pref, 32 pairs per step (1,661 steps), a checkpoint
# every 200 steps as in the authors' recipe (the paper evaluates checkpoints and keeps the best)
[ -e $S2/final ] || \
    torchrun --nproc_per_node $NGPU redi.py --model $SFT/final --data $OUT/data/pref.jsonl --out $S2 \
        $STAGE2 --grad-checkpointing --micro-batch-size $PAIR_MICRO --save-every 200 --resume

# Intermediate evals (PAPER.md §4), the ones that pick the best checkpoint, as the authors ran them (lighteval):
# MATH-500, 4 samples per problem, lighteval's user template with the checkpoint's own generation prompt (no
# forced <think>), the answer taken from the whole response (no </think> rule). For the SFT model and every
# stage-2 checkpoint; an evaluation already done is not redone. The report marks each run's best checkpoint
# and links RUN/best to it
INTERMEDIATE="--benchmark math500 --samples 4 --prompt lighteval --no-think-prefix --answer-from whole"
SFT_CKPT=$(readlink -f $SFT/final)
torchrun --nproc_per_node $NGPU eval.py --model $SFT_CKPT $INTERMEDIATE --out $SFT/eval/$(basename $SFT_CKPT)
for CKPT in $S2/ckpt/step_*; do
    torchrun --nproc_per_node $NGPU eval.py --model $CKPT $INTERMEDIATE --out $S2/eval/$(basename $CKPT)
done
python eval.py report $SFT $S2 --out $S2

# Final evals (PAPER.md §4), the numbers of the paper's tables: five benchmarks, 16 samples, pass@1 +- SEM and
# pass@16, with the forced <think> and the answer after the first </think>; for the SFT model (its rows of
# Tables 1-2) and the best stage-2 checkpoint
FINAL="--benchmark math500 aime24 amc23 minerva olympiadbench --samples 16 --prompt $PROMPT"
torchrun --nproc_per_node $NGPU eval.py --model $SFT_CKPT $FINAL --out $SFT/eval_final/$(basename $SFT_CKPT)
BEST=$(readlink -f $S2/best)
torchrun --nproc_per_node $NGPU eval.py --model $BEST $FINAL --out $S2/eval_final/$(basename $BEST)
