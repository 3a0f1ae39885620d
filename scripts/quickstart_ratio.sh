#!/bin/bash
# The quickstart's cost before and after its faster recipe, in one run on one machine: ABBA order (before, after,
# after, before) so that a drifting machine load falls on both alike. "before" is the recipe issue 16 timed (DiT-S/4 at
# hidden 128, depth 4, batch 128 × 64 epochs, LR 6e-3, EMA 0.999, N(0, 1) times, cfg 3), as overrides of
# configs/quickstart.yaml. Prints wall and CPU seconds and the 64-sample accuracy of each run.
#   bash scripts/quickstart_ratio.sh [WORK_DIR]      (about 14 min on a quiet 2-core machine)
set -euo pipefail
work=${1:-/tmp/quickstart-ratio}
mkdir -p "$work" && cd "$work"
before=(--model.name DiT-S/4 --model.hidden_size 128 --model.depth 4 --training.batch_size 128
        --training.num_epochs 64 --training.learning_rate 6e-3 --training.ema_decay 0.999 --diffusion.timestep_std 1.0
        --validation.cfg_scale 3.0)
i=0
for which in before after after before; do
  i=$((i + 1))
  extra=(); [ "$which" = before ] && extra=("${before[@]}")
  /usr/bin/time -f "$which-$i: wall %e s, cpu %U+%S s" ditpipe quickstart --out "out/$which-$i" "${extra[@]}" \
    > "$which-$i.log" 2>&1
  tail -1 "$which-$i.log"
  grep -o "class accuracy.*%" "$which-$i.log" | head -1
done
