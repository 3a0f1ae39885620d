#!/bin/bash
# The quickstart's training on a busy machine: six processes spin beside it (one CPU core's worth each), and the
# quickstart's config trains with ditpipe's default threads (pipeline/threads.py: the cores others leave free) and
# with each fixed setting (OMP_NUM_THREADS=1 … the core count), in one run, in ABBA-style rounds so that drifting load
# falls on each setting alike. Prints the img/s of each train (its closing line) and each setting's mean.
#   bash scripts/busy_threads.sh [WORK_DIR] [STEPS]      (about 10 min on a 2-core machine at 150 steps)
set -euo pipefail
work=${1:-/tmp/busy-threads}
steps=${2:-150}
mkdir -p "$work" && cd "$work" && rm -f rates.txt
export HF_HUB_OFFLINE=1
[ -f shards/manifest.json ] || ditpipe encode --config quickstart --out shards > encode.log 2>&1
spinners=()
for _ in 1 2 3 4 5 6; do python3 -c "while True: pass" & spinners+=($!); done
trap 'kill "${spinners[@]}" 2>/dev/null' EXIT
sleep 2
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
settings=(default $(seq 1 "$cores"))
order=("${settings[@]}")
for ((i = ${#settings[@]} - 1; i >= 0; i--)); do order+=("${settings[$i]}"); done  # forward, then backward
for s in "${order[@]}"; do
  env=(env -u OMP_NUM_THREADS -u MKL_NUM_THREADS); [ "$s" != default ] && env+=(OMP_NUM_THREADS="$s")
  "${env[@]}" COLUMNS=200 ditpipe train --config quickstart --shards.path shards --training.max_steps "$steps" \
    --validation.every_steps 0 --logging.output_dir "out-$s" --logging.run_name r > "train-$s.log" 2>&1 || true
  rm -rf "out-$s"
  rate=$(grep -o "[0-9,.]* img/s" "train-$s.log" | tail -1 | tr -d ,)
  threads=$(grep -o "threads *│ *[0-9]* per process" "train-$s.log" | grep -o "[0-9]* per" | head -1)
  echo "$s: $rate (threads: ${threads% per})" | tee -a rates.txt
done
python3 - <<'PY'
import collections, re
rates = collections.defaultdict(list)
for line in open("rates.txt"):
    m = re.match(r"(\w+): ([\d.]+) img/s", line)
    if m:
        rates[m.group(1)].append(float(m.group(2)))
means = {k: sum(v) / len(v) for k, v in rates.items()}
best = max((v, k) for k, v in means.items() if k != "default")
print({k: round(v, 1) for k, v in means.items()})
print(f"default / best fixed setting (OMP_NUM_THREADS={best[1]}): {means['default'] / best[0]:.3f}")
PY
