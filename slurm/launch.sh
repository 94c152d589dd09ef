#!/usr/bin/env bash
# Shared launcher of the sbatch recipes in this directory (also runs without SLURM).
#
#   launch.sh [--dry-run] -- TRAINING FLAGS...
#
# Inside a SLURM job: one task per GPU through srun (ranks from SLURM_PROCID/SLURM_NTASKS/
# SLURM_LOCALID), rendezvous at the first host of the allocation (scontrol show hostnames).
# Outside SLURM: torchrun on this machine with NPROC processes (default: GPUs, else 2).
#
# Run directory (RUN_DIR, default runs/$RUN_NAME under the submit directory; RUN_NAME is set by
# each recipe, else the job name):
#   RUN_DIR/checkpoints/   --save and --load: a requeued or resubmitted job resumes from here
#   RUN_DIR/tensorboard/   --tensorboard-dir
#   RUN_DIR/logs/<job id>-<restart>.log   the training output of each (re)start
#
# Environment overrides:
#   DATA_PATH        Megatron data prefix or weighted blend "W1 P1 W2 P2" (needed unless the
#                    recipe trains on mock data)
#   TOKENIZER_MODEL  SentencePiece model of that data (needed with DATA_PATH)
#   RUN_DIR          run directory (see above)
#   RUN_NAME         its name under runs/ (the recipes set one each)
#   PRORES_HOME      (read by the recipes) the checkout whose slurm/launch.sh they run
#   EXTRA_ARGS       flags appended last (they override the recipe's: argparse keeps the last);
#                    quote a word that holds spaces: EXTRA_ARGS="@'/my runs/x.args'"
#   PYTHON           interpreter (default python3); NPROC, MASTER_PORT
#
# Preemption and time limits: the recipes ask for `--signal=B:USR1@<s>` and `--requeue`. USR1
# reaches this script (the batch step), which passes it to every training task (scancel
# --signal); the tasks save at the next step boundary and exit 0, and this script requeues the
# job if training is not finished. A requeued job resumes from the last complete checkpoint with
# no user action. SIGTERM (scontrol requeue, preemption, scancel) goes to the tasks directly from
# SLURM: they save and exit too, and SLURM itself requeues or ends the job. A run that ends
# normally exits 0 and is not requeued.
set -euo pipefail
early_usr1=0
trap 'early_usr1=1' USR1 # a time-limit signal before the training runs is kept, not fatal

dry_run=0
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        *) echo "launch.sh: unknown option $1 (usage: launch.sh [--dry-run] -- TRAINING FLAGS)" >&2; exit 2 ;;
    esac
done
recipe=("$@")

PYTHON=${PYTHON:-python3}
in_slurm=0
[[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
job_name=${RUN_NAME:-${SLURM_JOB_NAME:-megatron-prores}}
RUN_DIR=${RUN_DIR:-$submit_dir/runs/$job_name}
ckpt=$RUN_DIR/checkpoints

split_words() { # split_words VAR ARRAY: $VAR's words into ARRAY, quotes as in a shell ('a b' is one word; nothing is run)
    local text
    text=$(printf '%s' "${!1}" | xargs printf '%s\n' 2> /dev/null) || {
        echo "launch.sh: $1 has a quote that is not closed ($1=${!1}); close it" >&2
        exit 2
    }
    mapfile -t "$2" <<< "$text"
}

# ---- data: DATA_PATH/TOKENIZER_MODEL, or the recipe's --mock-data -------------------------------
data=()
if [[ -n "${DATA_PATH:-}" ]]; then
    if [[ -z "${TOKENIZER_MODEL:-}" ]]; then
        echo "launch.sh: DATA_PATH is set but TOKENIZER_MODEL is not; set TOKENIZER_MODEL=/path/tokenizer.model" >&2
        exit 2
    fi
    split_words DATA_PATH blend
    data=(--data-path "${blend[@]}" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
elif [[ " ${recipe[*]} ${EXTRA_ARGS:-} " != *" --mock-data "* ]]; then
    if ((dry_run)); then
        data=(--data-path "<DATA_PATH>" --tokenizer-type SentencePieceTokenizer --tokenizer-model "<TOKENIZER_MODEL>")
    else
        echo "launch.sh: set DATA_PATH=<prefix of a .bin/.idx dataset> and TOKENIZER_MODEL=<sentencepiece model> (tools/preprocess_data.py makes them)" >&2
        exit 2
    fi
fi

extra=()
[[ -n "${EXTRA_ARGS:-}" ]] && split_words EXTRA_ARGS extra
flags=("${recipe[@]}" "${data[@]}"
       --save "$ckpt" --load "$ckpt" --tensorboard-dir "$RUN_DIR/tensorboard" --exit-signal-handler
       "${extra[@]}")

# ---- how to start the tasks ----------------------------------------------------------------------
if ((in_slurm)); then
    # sbatch passes on the submitting shell's environment: a RANK/WORLD_SIZE from there (torchrun's
    # variables, which the driver prefers) would make every task rank 0; the tasks' SLURM_* decide
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    launch=(srun --kill-on-bad-exit=1 --label)
    # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): pass it on
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && launch+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
    launch+=("$PYTHON" -u -m megatron_prores.train)
else
    if [[ -z "${NPROC:-}" ]]; then
        NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
    fi
    # torchrun that ends with the driver's error line and exit code (no ChildFailedError traceback);
    # a free port unless MASTER_PORT is given (a second run on this machine does not collide)
    rendezvous=(--standalone)
    [[ -n "${MASTER_PORT:-}" ]] && rendezvous=(--master-port "$MASTER_PORT")
    launch=("$PYTHON" -m megatron_prores.launch --nproc-per-node "$NPROC" "${rendezvous[@]}"
            -m megatron_prores.train)
fi

if ((dry_run)); then
    printf '%q ' "${launch[@]}" "${flags[@]}"
    echo
    exit 0
fi

if ! err=$(mkdir -p "$RUN_DIR/logs" "$ckpt" 2>&1); then
    echo "launch.sh: cannot create the run directory $RUN_DIR (${err##*: }); set RUN_DIR to a writable place" >&2
    exit 2
fi
log=$RUN_DIR/logs/${SLURM_JOB_ID:-local-$$}-${SLURM_RESTART_COUNT:-0}.log
echo "launch.sh: run directory $RUN_DIR, log $log, restart ${SLURM_RESTART_COUNT:-0}"
echo "launch.sh: $(printf '%q ' "${launch[@]}" "${flags[@]}")" | tee -a "$log"

got_usr1=0
pid=""
# shellcheck disable=SC2317  # called by the trap
on_usr1() {
    got_usr1=1
    echo "launch.sh: USR1 (time limit near): asking the training to save and exit" | tee -a "$log"
    if ((in_slurm)); then
        scancel --signal=USR1 "$SLURM_JOB_ID" || true # every task of every step, not this script
    else
        pkill -USR1 -P "$pid" 2> /dev/null || true # torchrun's workers
    fi
}
trap on_usr1 USR1
trap 'echo "launch.sh: TERM: the training saves and exits" | tee -a "$log"' TERM
interrupts=0
# shellcheck disable=SC2317  # called by the trap
on_int() { # Ctrl-C without SLURM (the training runs in a session of its own, out of the terminal's reach)
    interrupts=$((interrupts + 1))
    if ((interrupts == 1)); then
        echo "launch.sh: Ctrl-C: the training saves at the next step boundary and exits (Ctrl-C again: stop at once, without saving)" | tee -a "$log"
        pkill -USR1 -P "$pid" 2> /dev/null || true
    else
        echo "launch.sh: Ctrl-C again: stopping at once, without saving" | tee -a "$log"
        pkill -KILL -P "$pid" 2> /dev/null || true # the workers (torchrun starts each in a session of its own)
        kill -KILL "$pid" 2> /dev/null || true
    fi
}

# tee ignores TERM (and Ctrl-C's INT): SLURM signals every process of the job, and a dead tee
# would cut the training's output (and its save) short with a broken pipe.
if ((in_slurm)); then
    "${launch[@]}" "${flags[@]}" > >(trap '' TERM USR1 INT; exec tee -a "$log") 2>&1 &
else
    # its own session: a Ctrl-C reaches this script only, which asks the workers to save and exit
    # (torchrun itself would kill them on the terminal's SIGINT, within 30 s, mid-save or not)
    trap on_int INT
    setsid "${launch[@]}" "${flags[@]}" > >(trap '' TERM USR1 INT; exec tee -a "$log") 2>&1 &
fi
pid=$!
if ((early_usr1)); then
    # the time-limit signal came during set-up: --time is hardly longer than the --signal lead. Pass
    # it on once the tasks can take it (they have logged a step), and do not requeue: the restart
    # would be stopped at once again, and again
    echo "launch.sh: the time-limit signal came before training started: the job's --time is not longer than its" \
        "--signal lead; the training saves after its first logged step, and the job is not requeued (give a longer --time)" \
        | tee -a "$log"
    while kill -0 "$pid" 2> /dev/null && ! grep -q " iteration " "$log"; do sleep 1; done
    kill -0 "$pid" 2> /dev/null && on_usr1
fi
rc=0
while true; do
    wait "$pid" && rc=0 || rc=$?
    # wait returns >128 when a trapped signal interrupts it; the training is still running then
    if ((rc > 128)) && kill -0 "$pid" 2> /dev/null; then continue; fi
    break
done

latest=0
[[ -f "$ckpt/latest_checkpointed_iteration.txt" ]] && latest=$(< "$ckpt/latest_checkpointed_iteration.txt")
if ((rc == 0 && got_usr1 && in_slurm && !early_usr1)); then
    # the length as the driver reads the flags (`=` forms, @files, --train-samples); unknown: requeue
    # (a finished run that is requeued ends at once; an unfinished one that is not would stall)
    train_iters=$("$PYTHON" -c 'import sys; from megatron_prores.arguments import train_iters; print(train_iters(sys.argv[1:]))' \
        "${flags[@]}" 2> /dev/null | tail -n 1) || train_iters=""
    [[ $train_iters =~ ^[0-9]+$ ]] || train_iters=""
    if [[ -z "$train_iters" ]] || ((latest < train_iters)); then
        echo "launch.sh: saved at iteration $latest of ${train_iters:-?}; requeueing job $SLURM_JOB_ID" | tee -a "$log"
        scontrol requeue "$SLURM_JOB_ID" \
            || echo "launch.sh: SLURM refused to requeue job $SLURM_JOB_ID (--no-requeue, or the site forbids it);" \
                "submit the same job again to resume from iteration $latest" | tee -a "$log"
    fi
fi
echo "launch.sh: training exited with code $rc (latest checkpoint: iteration $latest)" | tee -a "$log"
exit "$rc"
