#!/usr/bin/env bash
# ditpipe on one H200 (or any CUDA GPU), in a few minutes, from synthetic data only (no dataset on that machine):
#   1. encode 256 px through the sd-vae-ft-ema-shaped VAE (random weights, the same cost), bf16;
#   2. train DiT-B/2 and DiT-XL/2 in bf16 on precomputed latents and, for the speedup, in the online-VAE mode;
# all through `ditpipe bench --device cuda`, which times N steps after warm-up and reports images/s and MFU against
# the H200's dense bf16 peak of 989 TFLOP/s, then extrapolates to 50 epochs of 5,000 images with DiT-B/2.
#
# Usage, from the repository root:
#   scripts/h200_bench.sh wheelhouse   # on a machine WITH network: fetch the wheels the GPU machine lacks
#   scripts/h200_bench.sh              # on the GPU machine (no network): install from ./wheelhouse, run, summarise
#
# The GPU machine has python3 with a CUDA torch, accelerate, pyarrow, rich, typer, safetensors, huggingface-hub,
# numpy, pillow, psutil, pyyaml, matplotlib; it lacks diffusers (and importlib-metadata), webdataset (and
# braceexpand), tensorboardX and pydantic (pydantic-core, annotated-types, typing-inspection, typing-extensions
# >= 4.16). Those come as wheels in ./wheelhouse (a few MB; untracked, so it travels with the working tree).
#
# Building the wheelhouse (needs network; any OS: `pip download` fetches the target platform's wheels):
#   PY_VER=3.12 scripts/h200_bench.sh wheelhouse
# which runs, in effect:
#   pip download --dest wheelhouse --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any  <the pinned list below>
#   pip wheel --no-deps --no-build-isolation --wheel-dir wheelhouse .       # ditpipe itself
# `--no-deps` keeps torch and CUDA out (gigabytes; the GPU machine has its own). If the install below stops with
# "No matching distribution found for X", add X to EXTRA_WHEELS and rebuild. Environment knobs: WHEELHOUSE (folder),
# OUT (results folder), VENV, PYTHON, COMPILE=1 (torch.compile the DiT: slower start, higher MFU), STEPS, BATCH.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
PINNED="diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 webdataset==1.0.2 braceexpand==0.1.7
tensorboardX==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 ${EXTRA_WHEELS:-}"

if [[ "${1:-run}" == "wheelhouse" ]]; then
    PY_VER=${PY_VER:-3.12}
    mkdir -p "$WHEELHOUSE"
    # shellcheck disable=SC2086
    python3 -m pip download --dest "$WHEELHOUSE" --no-deps --only-binary=:all: --python-version "$PY_VER" \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any $PINNED
    python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir "$WHEELHOUSE" .
    ls -la "$WHEELHOUSE"
    exit 0
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/ditpipe-venv}
OUT=${OUT:-bench-h200}  # the device tool sets $OUT to the folder it brings back
mkdir -p "$OUT"
[[ -d "$WHEELHOUSE" ]] || { echo "no $WHEELHOUSE/: build it first with '$0 wheelhouse' on a machine with network" >&2; exit 1; }

# A venv that sees the machine's CUDA torch (system site packages) and adds only what is missing, offline.
"$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --no-build-isolation -e . \
    || { echo "install failed: add the missing wheel(s) to $WHEELHOUSE (see the top of $0)" >&2; exit 1; }
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

STEPS=${STEPS:-20}
BATCH=${BATCH:-256}
COMPILE_FLAG=()
[[ "${COMPILE:-0}" == "1" ]] && COMPILE_FLAG=(--compile)
COMMON=(--device cuda --peak-tflops 989 --precision bf16 --vae-dtype bf16 --image-size 256 --vae-shape sd
        --batch-size "$BATCH" --steps "$STEPS" --num-workers 12 --encode-source shapes --encode-images 2048
        --encode-batch 64 --jpeg-count 64)

# 1+2a: encode (sd-shaped VAE, 256 px) and DiT-B/2 training, precomputed vs online VAE.
ditpipe bench encode,train --model DiT-B/2 "${COMMON[@]}" "${COMPILE_FLAG[@]}" --json "$OUT/encode-train-b2.json" \
    > /dev/null
# 2b: DiT-XL/2 training.
ditpipe bench train --model DiT-XL/2 "${COMMON[@]}" "${COMPILE_FLAG[@]}" --json "$OUT/train-xl2.json" > /dev/null

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
b2, xl = json.loads((out / "encode-train-b2.json").read_text()), json.loads((out / "train-xl2.json").read_text())
e = b2["encode"]
rows = [("device", b2["machine"]["device_name"], ""),
        ("encode 256 px, sd-shaped VAE bf16, image+mirror", f"{e['pipeline_images_per_s']:,.0f} img/s",
         f"{e['ratio']:.2f} of the bare VAE ({e['bare_images_per_s']:,.0f} img/s)")]
for r in (b2, xl):
    t = r["train"]
    rows.append((f"train {t['model']} bf16, batch {t['batch_size']}, precomputed",
                 f"{t['precomputed']['images_per_s']:,.0f} img/s", f"MFU {t['mfu_precomputed']:.1%}"))
    rows.append((f"train {t['model']} bf16, batch {t['batch_size']}, online VAE",
                 f"{t['online']['images_per_s']:,.0f} img/s",
                 f"speedup {t['speedup']:.2f}x of ideal {t['ideal_ratio']:.2f}x"))
t = b2["train"]
rows.append(("50 epochs x 5,000 images, DiT-B/2 (extrapolated)", f"{t['extrapolate']['precomputed_s']:,.0f} s",
             f"online VAE: {t['extrapolate']['online_s']:,.0f} s; + encode once: "
             f"{5000 / e['pipeline_images_per_s']:,.0f} s"))
print("\n| what | result | note |\n|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
for r in (b2, xl):
    for t in r["targets"]:
        if t["applies"]:
            print(f"target {t['name']}: {t['value']} ({t['target']}) -> {'met' if t['met'] else 'MISSED'}")
EOF
echo "JSON in $OUT/"
