#!/usr/bin/env bash
# The GPU run book: everything that needs a GPU, in one script, on one H100/H200 machine
# without network, inside a bare copy of the working tree (torch with CUDA is there; the
# pinned diffusers/transformers come as wheels in .whl/, see bench/gpu/fetch_wheels.sh;
# the project runs from the tree). Writes docs/benchmarks/gpu.md (or --markdown PATH):
#
#   1. the CUDA tests (the copy stream);
#   2. the exactness invariant per family, bf16 (bench/gpu/exactness.py);
#   3. bench/engine.py at FLUX.1's transformer dimensions (random weights, bf16,
#      1024x1024, 512 text tokens): masked / full per mask ratio, CUDA-event timing,
#      medians after a warm-up;
#   4. bench/cache.py on the GPU: the host tier in pinned memory (copied a site ahead on
#      a copy stream) against disk naive / pipelined and the full computation;
#   5. NVML: the metrics the instances publish can be read.
#
# --dry-run runs the same steps on the CPU with tiny sizes (a miniature of the FLUX.1
# transformer, 128x128) and writes to --markdown (default: a temporary file); CI runs it
# (tests/test_gpu_runbook.py). Budget on a GPU: under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0
MARKDOWN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --markdown) MARKDOWN="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--markdown PATH]" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/instgenie-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if ! $PY -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT/backend:$ROOT/protocol:$ROOT/server:$ROOT/client:$ROOT/router:$ROOT/cli:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "$DRY" = 1 ]; then
    DEVICE=cpu DTYPE=float32 DIMS=flux1-mini RESOLUTION=128 TEXT=64 RATIOS=0.2,1.0 REPEATS=1
    VARIANTS=flux-fill,sd-inpaint CACHE_ARGS=(--model-size tiny --resolution 128 --text-len 32 --steps 2 --repeats 1)
    MARKDOWN=${MARKDOWN:-$WORK/gpu.md}
else
    DEVICE=cuda DTYPE=bfloat16 DIMS=flux1 RESOLUTION=1024 TEXT=512 RATIOS=0.1,0.2,0.35,0.5,1.0 REPEATS=5
    VARIANTS=flux-fill,flux-inpaint,sd3-inpaint,sdxl-inpaint,sd-inpaint,sdxl-inpaint+b,sd-inpaint+b
    CACHE_ARGS=(--model-size small --resolution 512 --text-len 128 --steps 8 --repeats 3 --dtype bfloat16)
    MARKDOWN=${MARKDOWN:-docs/benchmarks/gpu.md}
fi
section() { echo; echo "== $1 ($(date +%T))"; }

section environment
$PY - > "$WORK/environment.md" <<'PYEOF'
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, Python {platform.python_version()}, {platform.machine()}")
PYEOF
cat "$WORK/environment.md"

section "CUDA tests"
set +e
$PY -m pytest -q -p no:cacheprovider tests/test_cache.py -k "gpu or copy_stream or staged" 2>&1 | tee "$WORK/tests.log"
TESTS_RC=${PIPESTATUS[0]}
set -e
tail -1 "$WORK/tests.log" > "$WORK/tests.md"

section "exactness per family"
$PY bench/gpu/exactness.py --device "$DEVICE" --dtype "$DTYPE" --variants "$VARIANTS" --markdown "$WORK/exactness.md"

section "masked vs full step at the transformer's dimensions"
$PY bench/engine.py --family flux-fill --size tiny --transformer-dims "$DIMS" --device "$DEVICE" --dtype "$DTYPE" \
    --resolution "$RESOLUTION" --text-len "$TEXT" --mask-ratios "$RATIOS" --repeats "$REPEATS" \
    --json "$WORK/engine.json" --markdown "$WORK/engine.md"

section "cache pipeline"
$PY bench/cache.py --device "$DEVICE" "${CACHE_ARGS[@]}" --cache-dir "$WORK" --json "$WORK/cache.json" --out "$WORK/cache.md"

section NVML
$PY - > "$WORK/nvml.md" <<'PYEOF'
try:
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    print(f"NVML answers: instgenie_gpu_utilization_ratio = {busy:.2f}, instgenie_gpu_memory_used_bytes = {used}")
except Exception as exc:  # the CPU dry run, or a machine without the driver's library
    print(f"NVML absent: {type(exc).__name__}: {exc} (instances then publish no GPU series)")
PYEOF
cat "$WORK/nvml.md"

mkdir -p "$(dirname "$MARKDOWN")"
{
    echo "# GPU run book"
    echo
    echo "Written by \`bench/gpu/run.sh$([ "$DRY" = 1 ] && echo " --dry-run")\` on $(date -u +%Y-%m-%d): $(cat "$WORK/environment.md")."
    echo "Device $DEVICE, $DTYPE. Every speed figure is a ratio measured side by side in this one run."
    echo
    echo "## 1. CUDA tests (copy stream)"
    echo
    echo "\`pytest tests/test_cache.py -k \"gpu or copy_stream or staged\"\`: $(cat "$WORK/tests.md")"
    echo
    echo "## 2. Exactness per family ($DTYPE): an edit equal to its template request, masked vs full"
    echo
    cat "$WORK/exactness.md"
    echo
    echo "## 3. Masked vs full step: flux-fill, transformer dimensions \`$DIMS\`, ${RESOLUTION}x${RESOLUTION}, $TEXT text tokens"
    echo
    sed -n '/^|/p' "$WORK/engine.md"
    echo
    grep -i "mixed batch" "$WORK/engine.md" || true
    echo
    echo "Goal: the masked step at mask ratio 0.2 at least 2.8x faster than the full step (time ratio <= 0.357)."
    echo
    echo "## 4. Cache pipeline"
    echo
    if [ "$DEVICE" = cuda ]; then
        echo "The host tier's rows (\`resident\`: pinned memory) include the host->device copies, issued a site ahead on a copy stream;"
    else
        echo "A CPU has no host->device copy: \`resident\` reads the cache in place (the dry run checks the script, not the figures);"
    fi
    echo "the disk rows add reading each step from disk (naive: when needed; pipelined: ahead). Goal: pipelined within 5% of resident."
    echo
    sed -n '/^| mask ratio/,/^$/p' "$WORK/cache.md"
    echo
    echo "## 5. NVML"
    echo
    cat "$WORK/nvml.md"
} > "$MARKDOWN"
echo
echo "wrote $MARKDOWN"
[ "$TESTS_RC" = 0 ] || [ "$TESTS_RC" = 5 ] || { echo "the CUDA tests failed (pytest exit $TESTS_RC)" >&2; exit 1; }
