#!/usr/bin/env bash
# LoRA training step benchmark: SD1.5 configs with random weights, LoRA dim 32 / alpha 16
# on the UNet and the text encoder, 512 px, batch 1, f32 on CPU, AdamW. sdkit
# (`sdkit train lora`, the real command) against diffusers + peft (bench/train/torch_train.py)
# in the same run: seconds per step (mean and fastest of steps 2..N), latent caching rate,
# peak RSS.
# Heavy (~4.3 GB of weights, minutes per step on 2 cores): run it on a quiet machine.
# Needs the reference venv: source ../shared/scripts/refenv.sh (sets $REFPY).
# Usage: bench/train/run.sh [STEPS]   (default 3)
# GRADIENT_CHECKPOINTING=1: both sides recompute UNet blocks in the backward.
# METHOD=dreambooth|textual_inversion|hypernetwork (default lora): the other methods, set up
# as torch_train.py describes; OPTIMIZER=adamw|adafactor|adamw8bit for dreambooth.
# FUSED=1 (dreambooth): both sides update each weight inside the backward (kohya's
# --fused_backward_pass; sdkit's --fused-backward-pass).
# THREADS=N runs both sides on N threads (RAYON_NUM_THREADS for sdkit, OMP_NUM_THREADS for
# PyTorch); default: every core.
# SDKIT_BIN=path times that sdkit binary (an A/B against a saved build); SKIP_TORCH=1 skips
# the PyTorch side. Extra sdkit arguments: SDKIT_ARGS (e.g. "--resolution 768
# --train-batch-size 2"; the PyTorch side takes RESOLUTION and BATCH).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-3}
OUT=bench/out/train
: "${REFPY:?source ../shared/scripts/refenv.sh first}"
mkdir -p "$OUT"
PROFILE=${PROFILE:-release}
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
if [ -n "${SDKIT_BIN:-}" ]; then BIN=$SDKIT_BIN
else cargo build --profile "$PROFILE" --bin sdkit --quiet; BIN=${CARGO_TARGET_DIR:-target}/$DIR/sdkit; fi
MODEL=$("$REFPY" bench/train/make_model.py "$OUT" 2>/dev/null | tail -1)
if [ -n "${THREADS:-}" ]; then export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS; fi
echo "machine: $(nproc --all) cores (${THREADS:-all} used), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(free -g | awk '/Mem:/{print $2}') GB RAM; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
[ "${SKIP_TORCH:-}" = 1 ] || "$REFPY" bench/train/torch_train.py "$MODEL" "$OUT/data" "$STEPS" 2>&1 | grep -v -i warn
METHOD=${METHOD:-lora}
OPTIMIZER=${OPTIMIZER:-adamw}
export METHOD OPTIMIZER
case "$METHOD" in
  lora) ARGS=(lora --network-dim 32 --network-alpha 16 --learning-rate 1e-4) ;;
  dreambooth) ARGS=(dreambooth --learning-rate 1e-6 --optimizer "$OPTIMIZER")
    [ "$OPTIMIZER" = adafactor ] && ARGS+=(--optimizer-args scale_parameter=False relative_step=False warmup_init=False) ;;
  textual_inversion) ARGS=(textual-inversion --init-word bench --num-vectors-per-token 1 --learning-rate 5e-4) ;;
  hypernetwork) ARGS=(hypernetwork --layer-structure 1,2,1 --learning-rate 5e-6) ;;
  *) echo "unknown METHOD $METHOD" >&2; exit 2 ;;
esac
rm -rf "$OUT/run"
/usr/bin/time -f "sdkit peak RSS %M KB" "$BIN" train "${ARGS[@]}" --model "$MODEL" --data "$OUT/data" \
  --out "$OUT/run" --output-name bench \
  --max-train-steps "$STEPS" --cache-latents --seed 0 --json --quiet \
  $([ "${GRADIENT_CHECKPOINTING:-}" = 1 ] && echo --gradient-checkpointing) \
  $([ "${FUSED:-}" = 1 ] && echo --fused-backward-pass) ${SDKIT_ARGS:-} \
  > "$OUT/sdkit.json"
"$REFPY" - "$OUT/sdkit.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r['step_seconds'][1:] or r['step_seconds']
for i, x in enumerate(r['step_seconds']):
    print(f"  sdkit step {i + 1}: {x:.2f} s")
print(f"sdkit: {r['seconds_per_step']:.2f} s/step (fastest {min(t):.2f}), latents {r['latent_images_per_second']:.2f} images/s, "
      f"{r['plan']['trainable_parameters']} trained parameters, {r['steps']} steps in {r['seconds']:.1f} s")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
