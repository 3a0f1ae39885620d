#!/usr/bin/env bash
# The GPU acceptance check: everything the CPU cannot prove, in parts that each fit one command of a lent GPU
# machine (at most 10 minutes a command, 15 minutes in all, bare and offline, 64 MiB carried).
#
#   scripts/gpu_check.sh wheelhouse   where pip works: fetch the wheels the GPU machine lacks into .whl/
#   scripts/gpu_check.sh install      on the GPU machine: install them and ditpipe into $SITE (once a machine)
#   scripts/gpu_check.sh tests-a      pytest -m cuda, the 30-step runs in fp16/bf16 and the compile tests
#   scripts/gpu_check.sh tests-b      pytest -m cuda, every other CUDA test
#   scripts/gpu_check.sh bench-b2     ditpipe bench encode,train, DiT-B/2 at batch 256 (bf16, sd-shaped VAE)
#   scripts/gpu_check.sh bench-xl2    ditpipe bench train --repa, DiT-XL/2 at batch $XL_BATCH (128: fits 80 GB), with and
#                                     without REPA
#   scripts/gpu_check.sh all          install and every part in turn (over 10 minutes: not for a lent machine)
#
# Every part after `install` checks the install is there and makes it if not, since a lent machine may be a fresh
# one. Each part runs under `timeout` ($PART_TIMEOUT, 420 s: inside 8 minutes with the install's minute) and writes
# its results to $OUT as it ends, so a later failure or a lost machine keeps the earlier figures: machine.txt (the
# GPU, the versions, the install), <part>.log, the bench JSON, summary.md (one line a part, a table a bench).
# No more than 8 files in $OUT for `all`: the most a lent machine sends back.
#
# The GPU machine this is written for (see /work/.library/device/KINDS.md): Python 3.12 with a CUDA torch 2.11,
# accelerate, pyarrow, transformers, tensorboard, rich, typer, numpy, pillow, pyyaml, safetensors, setuptools and
# wheel, but no diffusers, webdataset, pydantic or tensorboardX. The missing ones are installed with
# `pip install --target` into a folder on PYTHONPATH, not into a venv, which would hide the machine's CUDA torch;
# ditpipe itself is installed the same way from this checkout (so the check runs exactly this tree).
# Knobs: OUT (results folder), SITE (the --target folder), PY_VER (wheelhouse), STEPS, XL_BATCH, PYTEST_ARGS,
# PART_TIMEOUT (seconds a part may run).
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="wheelhouse install tests-a tests-b bench-b2 bench-xl2 all"
PART=${1:-all}
usage() { echo "usage: scripts/gpu_check.sh {${PARTS// /|}}  (see the comments at the top)" >&2; }
[[ $# -le 1 && " $PARTS " == *" $PART "* ]] || { usage; exit 2; }

WHEELS=${WHEELS:-.whl}
# The missing packages and what they need, pinned to what CI tests with (pydantic-core must match pydantic).
PINNED="diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 webdataset==1.0.2 braceexpand==0.1.7
tensorboardX==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 ${EXTRA_WHEELS:-}"

if [[ "$PART" == "wheelhouse" ]]; then
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download --dest "$WHEELS" --no-deps --only-binary=:all: --python-version "${PY_VER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any $PINNED || exit 1
    ls -la "$WHEELS"
    echo "now run scripts/gpu_check.sh install, then each part, on the GPU machine (the device tool: carry $WHEELS)"
    exit 0
fi

OUT=${OUT:-gpu-check}
SITE=${SITE:-/tmp/ditpipe-site}
LIMIT=${PART_TIMEOUT:-420}
mkdir -p "$OUT"
python3 -c "import torch" 2>/dev/null || { echo "gpu_check: python3 here has no torch; run this on the GPU machine" >&2; exit 2; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch sees no CUDA device here; this check is for a GPU machine (on CPU: pytest -q)" >&2
    exit 2
}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DITPIPE=(python3 -c "from ditpipe.stages.cli import entry; entry()")

note() { echo "$*" | tee -a "$OUT/summary.md"; }

# The install, once a machine: the carried wheels, then ditpipe from this tree (no dependencies: the machine's
# torch stays). The stamp is written last, so a half-done install is redone.
do_install() {
    if [[ -f "$SITE/.gpu_check-installed" ]] && python3 -c "import diffusers, webdataset, pydantic, tensorboardX" \
        2>/dev/null; then
        return 0
    fi
    [[ -d "$WHEELS" ]] || { echo "gpu_check: no $WHEELS/: run '$0 wheelhouse' where pip works first" >&2; return 2; }
    local start=$SECONDS
    timeout 300 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "gpu_check: installing the wheels failed: add what is missing to EXTRA_WHEELS" >&2
                             return 1; }
    timeout 300 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" \
        --upgrade . || { echo "gpu_check: installing ditpipe from this checkout failed" >&2; return 1; }
    touch "$SITE/.gpu_check-installed"
    echo "installed into $SITE in $(( SECONDS - start )) s" | tee -a "$OUT/machine.txt"
}

# One pytest invocation under the part's time limit; its log and a one-line result as it ends.
run_tests() {  # run_tests NAME -k EXPRESSION
    local name=$1 start=$SECONDS
    shift
    # shellcheck disable=SC2086
    timeout -k 20 "$LIMIT" python3 -m pytest -q -m cuda -p no:cacheprovider -rs ${PYTEST_ARGS:-} "$@" tests 2>&1 \
        | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    note "$name: pytest -m cuda $*: exit $rc in $(( SECONDS - start )) s$([[ $rc == 124 ]] && echo ' (timed out)')"
    return "$rc"
}

COMMON=(--device cuda --precision bf16 --vae-dtype bf16 --image-size 256 --vae-shape sd --steps "${STEPS:-20}"
        --num-workers 8 --encode-source shapes --encode-images 2048 --encode-batch 64)

bench() {  # bench NAME PARTS ARGS...: the JSON as it ends, then its table
    local name=$1 parts=$2 start=$SECONDS
    shift 2
    timeout -k 20 "$LIMIT" "${DITPIPE[@]}" bench "$parts" "$@" "${COMMON[@]}" --json "$OUT/$name.json" \
        > /dev/null 2> "$OUT/$name.log"
    local rc=$?
    note "$name: ditpipe bench $parts $*: exit $rc in $(( SECONDS - start )) s$([[ $rc == 124 ]] && echo ' (timed out)')"
    [[ $rc == 0 ]] && summarise "$OUT/$name.json" | tee -a "$OUT/summary.md"
    return "$rc"
}

summarise() {
    python3 - "$1" <<'EOF'
import json, sys
from pathlib import Path
r = json.loads(Path(sys.argv[1]).read_text())
rows = []
if "encode" in r:
    e = r["encode"]
    rows.append(("encode 256 px, sd-shaped VAE bf16, image+mirror", f"{e['pipeline_images_per_s']:,.0f} img/s",
                 f"{e['ratio']:.2f} of the bare VAE ({e['bare_images_per_s']:,.0f} img/s)"))
t = r["train"]
mfu = f"MFU {t['mfu_precomputed']:.1%}" if t.get("mfu_precomputed") is not None else "MFU n/a"
rows.append((f"train {t['model']} {t['precision']}, batch {t['batch_size']}, precomputed",
             f"{t['precomputed']['images_per_s']:,.0f} img/s", f"{mfu} ({t['dit_gflops_per_step']:,.0f} GFLOP a step)"))
rows.append((f"train {t['model']} {t['precision']}, batch {t['batch_size']}, online VAE",
             f"{t['online']['images_per_s']:,.0f} img/s",
             f"speedup {t['speedup']:.2f}x of the ideal {t['ideal_ratio']:.2f}x"))
print("\n| what | result | note |\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print(f"\nFLOPs: {t['flops_convention']}\n")
EOF
}

rc=0
run_part() {
    case $1 in
        tests-a) run_tests tests-a -k "30_steps or compile" ;;  # the 30-step runs and every compile
        tests-b) run_tests tests-b -k "not (30_steps or compile)" ;;
        bench-b2) bench bench-b2 encode,train --model DiT-B/2 --batch-size 256 ;;
        bench-xl2) bench bench-xl2 train --model DiT-XL/2 --batch-size "${XL_BATCH:-128}" --repa ;;
    esac || rc=1
}
do_install || exit $?
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
} | tee -a "$OUT/machine.txt"
[[ "$PART" == "install" ]] && exit 0
if [[ "$PART" == "all" ]]; then
    for p in tests-a tests-b bench-b2 bench-xl2; do run_part "$p"; done
else
    run_part "$PART"
fi
echo "gpu_check $PART: exit $rc; results in $OUT/"
exit "$rc"
