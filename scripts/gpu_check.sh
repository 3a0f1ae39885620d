#!/usr/bin/env bash
# The GPU acceptance check: everything the CPU cannot prove, in one command, on a CUDA machine without network.
#
#   1. `pytest -m cuda`: fp16 (GradScaler) and bf16 steps with EMA, torch.compile and gradient checkpointing; the
#      step under torch.cuda.set_sync_debug_mode("error"); every part on the GPU; bitwise resume with
#      training.deterministic; a CPU-written checkpoint resumed in fp16; bf16 grids and sampling; VAE encode in bf16
#      and its out-of-memory back-off; a 2-process DDP run when there are 2 GPUs;
#   2. `ditpipe bench encode,train --device cuda` for DiT-B/2 (encode through the sd-vae-ft-ema-shaped VAE, random
#      weights, the same cost) and `bench train` for DiT-XL/2 at batch 128: images/s, MFU, the online-VAE speedup.
# Each part writes its results to $OUT as soon as it ends, so a late failure keeps the earlier figures. About 6
# minutes on one H200.
#
# Usage, from the repository root:
#   scripts/gpu_check.sh wheelhouse   # where pip works: fetch the wheels the GPU machine lacks into .whl/
#   scripts/gpu_check.sh              # on the GPU machine: install them into a --target folder, run, summarise
#
# The GPU machine this is written for (see /work/.library/device/KINDS.md): Python 3.12 with a CUDA torch 2.11,
# accelerate, pyarrow, transformers, tensorboard, rich, typer, numpy, pillow, pyyaml, safetensors, setuptools and
# wheel, but no diffusers, webdataset, pydantic or tensorboardX. The missing ones are installed with
# `pip install --target` into a folder on PYTHONPATH, not into a venv, which would hide the machine's CUDA torch;
# ditpipe itself is installed the same way from this checkout (so the check runs exactly this tree).
# Knobs: OUT (results folder), SITE (the --target folder), PY_VER (wheelhouse), STEPS, XL_BATCH, PYTEST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
# The missing packages and what they need, pinned to what CI tests with (pydantic-core must match pydantic).
PINNED="diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 webdataset==1.0.2 braceexpand==0.1.7
tensorboardX==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 ${EXTRA_WHEELS:-}"

if [[ "${1:-run}" == "wheelhouse" ]]; then
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download --dest "$WHEELS" --no-deps --only-binary=:all: --python-version "${PY_VER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any $PINNED || exit 1
    ls -la "$WHEELS"
    echo "now run scripts/gpu_check.sh on the GPU machine (the device tool: carry $WHEELS)"
    exit 0
fi

OUT=${OUT:-gpu-check}
SITE=${SITE:-/tmp/ditpipe-site}
mkdir -p "$OUT"
python3 -c "import torch" 2>/dev/null || { echo "gpu_check: python3 here has no torch; run this on the GPU machine" >&2; exit 2; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch sees no CUDA device here; this check is for a GPU machine (on CPU: pytest -q)" >&2
    exit 2
}
[[ -d "$WHEELS" ]] || { echo "gpu_check: no $WHEELS/: run '$0 wheelhouse' where pip works first" >&2; exit 2; }

# Install: the carried wheels, then ditpipe from this tree (no dependencies: the machine's torch stays).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing the wheels failed: add what is missing to EXTRA_WHEELS" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" --upgrade . \
    || { echo "gpu_check: installing ditpipe from this checkout failed" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DITPIPE=(python3 -c "from stages.cli import entry; entry()")

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/machine.txt"

# 1. the CUDA tests
start=$(date +%s)
# shellcheck disable=SC2086
python3 -m pytest -q -m cuda -p no:cacheprovider -rs ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/pytest-cuda.log"
tests_rc=${PIPESTATUS[0]}
echo "pytest -m cuda: exit $tests_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest-cuda.log"

# 2. the benchmarks, one JSON per part as it ends
COMMON=(--device cuda --precision bf16 --vae-dtype bf16 --image-size 256 --vae-shape sd --steps "${STEPS:-20}"
        --num-workers 8 --encode-source shapes --encode-images 2048 --encode-batch 64)
"${DITPIPE[@]}" bench encode,train --model DiT-B/2 --batch-size 256 "${COMMON[@]}" --json "$OUT/bench-b2.json" \
    > /dev/null 2> "$OUT/bench-b2.log" || echo "bench DiT-B/2 failed: see $OUT/bench-b2.log"
"${DITPIPE[@]}" bench train --model DiT-XL/2 --batch-size "${XL_BATCH:-128}" "${COMMON[@]}" \
    --json "$OUT/bench-xl2.json" > /dev/null 2> "$OUT/bench-xl2.log" || echo "bench DiT-XL/2 failed: see $OUT/bench-xl2.log"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name in ("bench-b2.json", "bench-xl2.json"):
    path = out / name
    if not path.is_file():
        rows.append((name, "missing", "the part failed; its .log says why"))
        continue
    r = json.loads(path.read_text())
    if "encode" in r:
        e = r["encode"]
        rows.append(("encode 256 px, sd-shaped VAE bf16, image+mirror", f"{e['pipeline_images_per_s']:,.0f} img/s",
                     f"{e['ratio']:.2f} of the bare VAE ({e['bare_images_per_s']:,.0f} img/s)"))
    t = r["train"]
    mfu = f"MFU {t['mfu_precomputed']:.1%}" if t.get("mfu_precomputed") is not None else "MFU n/a"
    rows.append((f"train {t['model']} {t['precision']}, batch {t['batch_size']}, precomputed",
                 f"{t['precomputed']['images_per_s']:,.0f} img/s", mfu))
    rows.append((f"train {t['model']} {t['precision']}, batch {t['batch_size']}, online VAE",
                 f"{t['online']['images_per_s']:,.0f} img/s",
                 f"speedup {t['speedup']:.2f}x of the ideal {t['ideal_ratio']:.2f}x"))
print("\n| what | result | note |\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
EOF
echo "gpu_check: pytest exit $tests_rc; results in $OUT/"
exit "$tests_rc"
