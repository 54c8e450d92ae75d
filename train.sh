#!/usr/bin/env bash
# The paper's experiment grid, one function per experiment, and the same grid at toy scale on a CPU.
#
#   NGPU=8 ./train.sh table2        # Table 2 / Fig. 3: tasks x algorithms x 3 seeds, win rates over pi_0
#   NGPU=8 ./train.sh pareto        # Fig. 4: a beta sweep per algorithm (Table 5 ranges), reward vs KL
#   NGPU=8 ./train.sh ablations     # Fig. 5: alpha, beta, K and w_clip for DAR on Helpfulness
#   NGPU=8 ./train.sh helpsteer2    # Table 4: standard RLHF with a reward model
#   ./train.sh toy-table2           # each of the above at toy scale on a CPU: toy-pareto, toy-ablations,
#                                   # toy-alpha (TOY_JUDGE=toy_proxy: on the unbounded proxy, runs/toy-proxy-*)
#   ./train.sh smollm2              # SmolLM2-135M-Instruct, positive sentiment: DAR, GRPO, online DPO on a CPU
#
# Every run writes runs/GRID/NAME-sSEED (metrics.jsonl, checkpoints, final/, eval.json); a finished run
# is skipped and a killed one resumes (--resume), so a grid can be restarted at any time. After the runs,
# `python eval.py` aggregates the seeds and draws the curves, frontiers and ablations into runs/GRID/eval.
#
# Settings come from the environment:
#   NGPU         processes per node (torchrun when > 1)              PYTHON   interpreter (python)
#   SEEDS        "0 1 2"                                             RUNS     output root (runs)
#   EXTRA        flags appended to every dar.py call (e.g. "--steps 2" for a smoke test)
#   MODEL_tldr, MODEL_helpful, MODEL_harmless, MODEL_helpsteer2: each task's SFT policy pi_0
#   JUDGE_URL, JUDGE_MODEL: the annotator endpoint (paper: Qwen2-72B-Instruct), REWARD_MODEL for HelpSteer2
#   EVAL_JUDGE_URL, EVAL_JUDGE_MODEL: the evaluator (paper: GPT-4-Turbo; its key in DAR_EVAL_JUDGE_API_KEY);
#                unset, the annotator evaluates too
#   DATA_tldr, ...: a local data file per task (--data) when the Hub is out of reach
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs}
EXTRA=${EXTRA:-}

ONLINE_RLHF="ppo rloo grpo dar"
ALL="dpo simpo online_dpo ipo slic ppo rloo grpo dar"

launch() {
  if [ "$NGPU" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" dar.py "$@"
  else
    "$PYTHON" dar.py "$@"
  fi
}

# run OUT_DIR FLAGS...: one training run, skipped when finished, resumed when interrupted
run() {
  local out=$1; shift
  if [ -f "$out/eval.json" ]; then echo "done: $out"; return 0; fi
  echo "run: $out"
  # shellcheck disable=SC2086
  launch "$@" --out-dir "$out" --resume $EXTRA
}

evaluate() {  # evaluate GRID [N_PROMPTS [FLAGS]]: seeds aggregated, curves, frontiers, ablations (paper: 1k prompts)
  local grid=$1 n=${2:-1000}; shift; shift || true
  "$PYTHON" eval.py "$RUNS/$grid"/*-s[0-9]*/ --out "$RUNS/$grid/eval" --n-prompts "$n" "$@"
}

task_flags() {  # task_flags TASK: the task's model, data and judge
  local task=$1 model data
  model=$(eval echo "\${MODEL_$task:-}")
  data=$(eval echo "\${DATA_$task:-}")
  [ -n "$model" ] || { echo "set MODEL_$task to the SFT policy of $task" >&2; exit 2; }
  echo "--task $task --model $model ${data:+--data $data}"
  if [ "$task" = helpsteer2 ]; then echo "--reward-model ${REWARD_MODEL:?set REWARD_MODEL}";
  else echo "--judge-url ${JUDGE_URL:?set JUDGE_URL} ${JUDGE_MODEL:+--judge-model $JUDGE_MODEL}" \
    "${EVAL_JUDGE_URL:+--eval-judge-url $EVAL_JUDGE_URL} ${EVAL_JUDGE_MODEL:+--eval-judge-model $EVAL_JUDGE_MODEL}"; fi
}

# --- the paper's experiments (GPUs) ---------------------------------------------------------------
table2() {
  for task in tldr helpful harmless; do
    for algo in $ALL; do
      for s in $SEEDS; do
        # shellcheck disable=SC2046
        run "$RUNS/table2/$task-$algo-s$s" $(task_flags "$task") --algo "$algo" --seed "$s" --rollout vllm
      done
    done
  done
  evaluate table2 1000 --checkpoints  # Table 2: the best checkpoints (on validation prompts) beside the final
}

pareto() {  # Table 5 ranges; alpha fixed as in Appendix B.4
  local task=helpful
  for b in 0.01 0.02 0.03 0.05 0.1; do
    for algo in ppo dual_ppo; do
      # shellcheck disable=SC2046
      run "$RUNS/pareto/$algo-beta$b-s0" $(task_flags $task) --algo $algo --beta "$b" --seed 0 --rollout vllm
    done
  done
  for b in 0.005 0.01 0.03 0.05 0.1; do
    # shellcheck disable=SC2046
    run "$RUNS/pareto/rloo-beta$b-s0" $(task_flags $task) --algo rloo --beta "$b" --seed 0 --rollout vllm
  done
  for b in 0.001 0.005 0.01 0.02 0.03 0.04; do
    # shellcheck disable=SC2046
    run "$RUNS/pareto/grpo-beta$b-s0" $(task_flags $task) --algo grpo --beta "$b" --seed 0 --rollout vllm
  done
  for b in 0.05 0.1 0.3 0.5; do
    # shellcheck disable=SC2046
    run "$RUNS/pareto/dar-beta$b-s0" $(task_flags $task) --algo dar --alpha 0.1 --beta "$b" --seed 0 --rollout vllm
  done
  evaluate pareto
}

ablations() {  # Fig. 5 (c)-(f) on Helpfulness: one parameter varied, the others at DAR's defaults (the
               # default run, alpha 0.1, is the beta 0.05 / K 4 / w_clip 20 point of the other sweeps)
  local task=helpful
  for s in $SEEDS; do
    for a in 0 0.1 0.3 0.5 0.7 0.9; do
      # shellcheck disable=SC2046
      run "$RUNS/ablations/alpha$a-s$s" $(task_flags $task) --alpha "$a" --seed "$s" --rollout vllm; done
    for b in 0.1 0.3 0.5; do
      # shellcheck disable=SC2046
      run "$RUNS/ablations/beta$b-s$s" $(task_flags $task) --beta "$b" --seed "$s" --rollout vllm; done
    for k in 2 8; do
      # shellcheck disable=SC2046
      run "$RUNS/ablations/k$k-s$s" $(task_flags $task) --k "$k" --online-batch $((128 * k)) --seed "$s" --rollout vllm; done
    for c in 5 10 50; do
      # shellcheck disable=SC2046
      run "$RUNS/ablations/wclip$c-s$s" $(task_flags $task) --w-clip "$c" --seed "$s" --rollout vllm; done
  done
  evaluate ablations
}

helpsteer2() {  # Table 4: Qwen2-7B-Instruct, a reward model, 1000 new tokens
  for algo in rloo grpo iter_sft dar; do
    for s in $SEEDS; do
      # shellcheck disable=SC2046
      run "$RUNS/helpsteer2/$algo-s$s" $(task_flags helpsteer2) --algo "$algo" --seed "$s" --rollout vllm
    done
  done
  evaluate helpsteer2
}

# --- the same at toy scale on a CPU -----------------------------------------------------------------
# Trained on a biased annotator and evaluated with the gold rule, like the paper's LLM annotator and stronger
# evaluator: regularisation has something to hold off (reward hacking). TOY_JUDGE picks the annotator:
#   toy_biased  (default) the bounded 1-10 annotator with a verbosity bias (tasks.toy_biased_score): it rates the
#               exact answer 8 and the same + 2 characters 10, so the exploit pays only within the scale
#   toy_proxy   the unbounded stress test (tasks.toy_proxy_score): a point per extra character, EOS unchecked;
#               its runs go to toy-proxy-* (TOY_JUDGE=toy_proxy ./train.sh toy-table2)
TOY_JUDGE=${TOY_JUDGE:-toy_biased}
case $TOY_JUDGE in
  toy_biased) TOY_GRID=toy ;;
  toy_proxy) TOY_GRID=toy-proxy ;;
  *) echo "TOY_JUDGE is toy_biased or toy_proxy, not $TOY_JUDGE" >&2; exit 2 ;;
esac
TOY="--task toy --judge $TOY_JUDGE --eval-judge toy_gold --steps 40 --eval-prompts 128 --save-every 10
 --keep-checkpoints 4"

toy-table2() {  # every method at its paper settings (config.ALGO_DEFAULTS)
  for algo in dpo simpo is_dpo online_dpo ipo slic ppo dual_ppo rloo grpo iter_sft dao dar; do
    for s in $SEEDS; do
      # shellcheck disable=SC2086
      run "$RUNS/$TOY_GRID-table2/$algo-s$s" $TOY --algo "$algo" --seed "$s"
    done
  done
  evaluate "$TOY_GRID-table2" 128 --checkpoints
}

toy-pareto() {  # gold reward vs KL over a beta sweep; DAR at the ablations' alpha (below)
  for b in 0.01 0.03 0.1 0.3; do
    for algo in ppo dual_ppo rloo grpo; do
      # shellcheck disable=SC2086
      run "$RUNS/$TOY_GRID-pareto/$algo-beta$b-s0" $TOY --algo $algo --beta "$b" --seed 0
    done
  done
  for b in 0.05 0.1 0.3 0.5 1.0 2.0; do
    # shellcheck disable=SC2086
    run "$RUNS/$TOY_GRID-pareto/dar-beta$b-s0" $TOY --algo dar --alpha "$(toy_alpha)" --beta "$b" --seed 0
  done
  evaluate "$TOY_GRID-pareto" 128
}

# DAR's ablations, each sweep varying one parameter around a base. Under toy_biased the base is the paper's
# (alpha 0.1, beta 0.05, K 4, w_clip 20): the setting the bounded annotator is there to test. Under toy_proxy
# DAR hacks at the paper's alpha 0.1 and beta 0.05 (alpha * beta is the fixed point's temperature), so its
# ablations sit at alpha 0.5, beta 0.5, where alpha can act. K keeps 64 prompts per online batch (64 K).
toy_alpha() { if [ "$TOY_JUDGE" = toy_proxy ]; then echo 0.5; else echo 0.1; fi; }
toy_base() {
  if [ "$TOY_JUDGE" = toy_proxy ]; then local beta=0.5; else local beta=0.05; fi
  echo "$TOY --algo dar --alpha $(toy_alpha) --beta $beta --k 4 --online-batch 256 --w-clip 20"
}

toy_alpha_runs() {
  for s in $SEEDS; do
    # shellcheck disable=SC2046
    for a in 0 0.1 0.3 0.5 0.9; do run "$RUNS/$TOY_GRID-ablations/alpha$a-s$s" $(toy_base) --alpha "$a" --seed "$s"; done
  done
}

toy-alpha() {  # Fig. 5 (c) alone: does alpha = 0 (no pi_0 in the objective) hack the annotator, and by how much?
  toy_alpha_runs
  evaluate "$TOY_GRID-ablations" 128 --checkpoints
}

toy-ablations() {  # Fig. 5 (c)-(f): alpha, then beta, K and w_clip
  toy_alpha_runs
  for s in $SEEDS; do
    # shellcheck disable=SC2046
    for b in 0.1 2.0; do run "$RUNS/$TOY_GRID-ablations/beta$b-s$s" $(toy_base) --beta "$b" --seed "$s"; done
    # shellcheck disable=SC2046
    for k in 2 8; do run "$RUNS/$TOY_GRID-ablations/k$k-s$s" $(toy_base) --k "$k" --online-batch $((64 * k)) --seed "$s"; done
    # shellcheck disable=SC2046
    for c in 2 5 100; do run "$RUNS/$TOY_GRID-ablations/wclip$c-s$s" $(toy_base) --w-clip "$c" --seed "$s"; done
  done
  evaluate "$TOY_GRID-ablations" 128 --checkpoints
}

# --- a real pretrained model on a CPU (README: "Results on a real model") --------------------------------
# pi_0 = SmolLM2-135M-Instruct; prompts = sentences of Python's documentation (--task sentiment); trained on
# VADER's sentiment, evaluated with TextBlob's plus distinct-n and length (repetition games both scorers).
# DAR at the paper's standard-RLHF alpha 0.5, beta 0.5 and GRPO at its beta 0.03 (tasks.TASK_ALGO_DEFAULTS),
# online DPO at beta 0.1; then DAR at beta 0.1 and GRPO at beta 0.3. One seed, the same budget for each: 32
# online batches of 2 prompts x K 4 = 8 responses of at most 32 new tokens, one optimizer step per batch, lr 2e-5
# after 2 warm-up steps; about 17 s a batch, 9 min a run. One thread per process: on a shared CPU torch's
# default threads spin against the other processes (a batch took 540 s with 2 threads, 45 s with 1).
SMOLLM2="--task sentiment --model smollm2-135m-instruct --online-batch 8 --k 4 --minibatch 8 --micro-batch 4
 --max-new-tokens 32 --steps 32 --lr 2e-5 --warmup-steps 2 --eval-prompts 0 --save-every 4 --keep-checkpoints 1"

smollm2() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # NAME:FLAGS. Each method at its default, then DAR and GRPO at a second beta: two points of each frontier
  local runs=("dar:" "grpo:" "online_dpo:" "dar-beta0.1:--beta 0.1" "grpo-beta0.3:--beta 0.3") r name
  for r in "${runs[@]}"; do
    name=${r%%:*}  # a finished run resumes at its end and only writes final/ again; a shorter one is extended
    # shellcheck disable=SC2086
    launch $SMOLLM2 --algo "${name%%-*}" ${r#*:} --seed 0 --out-dir "$RUNS/smollm2/$name-s0" --resume $EXTRA
  done
  evaluate smollm2 64  # all 64 test prompts: TextBlob win rate and reward, KL, distinct-n, length
  mkdir -p results
  for f in "$RUNS"/smollm2/eval/*.{csv,png,json}; do cp "$f" "results/smollm2-sentiment-$(basename "$f")"; done
}

if [ $# -eq 0 ] || ! declare -F "$1" >/dev/null; then
  echo "usage: [NGPU=8] ./train.sh table2|pareto|ablations|helpsteer2|toy-table2|toy-pareto|toy-ablations|toy-alpha|smollm2" >&2
  exit 2
fi
"$@"; exit  # on the same line: bash reads a script as it runs, so an edit made meanwhile cannot be run
