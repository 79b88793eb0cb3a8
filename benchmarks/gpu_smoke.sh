#!/usr/bin/env bash
# GPU smoke check for one CUDA device (about 5 minutes on an H100): the main job, a personal
# stage from a shared model with the strength chosen on validation, a SIGKILL mid-run then
# --resume, deterministic reruns, both exports, and SmolLM2's step time against PEFT LoRA.
# One PASS or FAIL line per check; the exit code is the number of failures. Logs go to
# $OUT/smoke/*.log. SMOKE_ALLOW_CPU=1 runs the same checks on a machine without CUDA (to check
# the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:=out}"
W="$OUT/smoke"
rm -rf "$W" && mkdir -p "$W"
python -c "import sharelora" 2>/dev/null || python -m pip install --quiet -e ".[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
fails=0

check() {  # check NAME COMMAND...: run it, print PASS/FAIL and the log's tail on failure
  local name=$1
  shift
  if "$@" >"$W/$name.log" 2>&1; then
    echo "PASS $name"
  else
    echo "FAIL $name"
    tail -n 8 "$W/$name.log" | sed 's/^/    /'
    fails=$((fails + 1))
  fi
}

python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" ||
  [ "${SMOKE_ALLOW_CPU:-0}" = 1 ] || { echo "FAIL no CUDA device"; exit 1; }

check pytest-devices python -m pytest -q tests/test_devices.py tests/test_train.py
check demo-quick sharelora demo --quick --no-progress --output "$W/demo"

DATA=(--data builtin:demo --top-users 5 --max-per-user 25 --max-length 128 --no-progress)
TOP=(--top-layers 1)
check train-shared sharelora train "${DATA[@]}" "${TOP[@]}" --method shared --epochs 2 \
  --output "$W/shared"
PERSONAL=("${DATA[@]}" "${TOP[@]}" --init-from "$W/shared" --strength auto --epochs 4 --eval-every 2)
check train-init-from sharelora train "${PERSONAL[@]}" --output "$W/personal"

# SIGKILL once the first checkpoint exists, then resume: optimizer state and the population
# come back from CPU files onto the GPU.
sharelora train "${PERSONAL[@]}" --output "$W/killed" >"$W/killed.log" 2>&1 &
pid=$!
for _ in $(seq 300); do
  [ -d "$W/killed/checkpoints/last" ] && break
  sleep 0.5
done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
check resume sharelora train "${PERSONAL[@]}" --output "$W/killed" --resume
check resume-equals-uninterrupted python - "$W/personal" "$W/killed" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/adapters.safetensors") for d in sys.argv[1:])
worst = max((a[k] - b[k]).abs().max().item() for k in a)
print("max |difference|", worst)
assert worst < 1e-4, worst  # bf16 autocast on CUDA: equal up to kernel rounding
EOF

for run in d1 d2; do
  check "deterministic-$run" sharelora train "${DATA[@]}" --epochs 1 --deterministic \
    --output "$W/$run"
done
check deterministic-identical python - "$W/d1" "$W/d2" <<'EOF'
import sys
import torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/adapters.safetensors") for d in sys.argv[1:])
assert all(torch.equal(a[k], b[k]) for k in a), "deterministic runs differ"
EOF

USER_NAME=$(python -c "import json; print(json.load(open('$W/personal/users.json'))['users'][0])")
check export-merged sharelora export --model "$W/personal" --user "$USER_NAME" --format merged \
  --output "$W/merged"
check export-peft sharelora export --model "$W/personal" --user "$USER_NAME" --format peft \
  --output "$W/peft"
check exports-score-like-the-model python - "$W" "$USER_NAME" <<'EOF'
import sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from sharelora import PersonalizedRewardModel
from sharelora.score import score_texts
w, user = sys.argv[1:]
device = "cuda" if torch.cuda.is_available() else "cpu"
texts = ["A short, friendly reply.", "An answer with a list:\n- one\n- two"]
model = PersonalizedRewardModel.from_pretrained(f"{w}/personal").to(device)
want = torch.tensor(score_texts(model, None, texts, [user] * 2))
tok = AutoTokenizer.from_pretrained(f"{w}/merged")
merged = AutoModelForSequenceClassification.from_pretrained(f"{w}/merged").to(device).eval()
with torch.no_grad():
    got = merged(**tok(texts, return_tensors="pt", padding=True).to(device)).logits.squeeze(-1)
print("model", want.tolist(), "merged", got.tolist())
assert torch.allclose(got.float().cpu(), want, atol=1e-3)
EOF

# A real decoder's shape: SmolLM2-135M, bf16, adapters in the top 4 blocks, 10^4 users, step
# time against PEFT LoRA on the same blocks and peak memory (PASS within its budget).
check smollm2-vs-peft python benchmarks/gpu_smollm2.py --quick --json "$W/smollm2.json"
tail -n 5 "$W/smollm2-vs-peft.log" | sed 's/^/    /'

echo "$fails failure(s)"
exit "$fails"
