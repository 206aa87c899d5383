#!/usr/bin/env bash
# The main job, end to end: two Triton servers with the tiny default model behind the
# mask-aware router; one template registered and one edit through the router with the
# CLI (gRPC, streamed progress), exactly as against a single server, and once more through
# the OpenAI-compatible endpoint. Writes out/edited.png and out/edited_openai.png.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p out
$BIN/python bench/sample_inputs.py out

pids=()
trap 'for pid in "${pids[@]}"; do kill -TERM $pid 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

# wait_ready FILE PID LOG: until FILE says "ready", or fail with a pointer to LOG.
wait_ready() {
    for _ in $(seq 1 600); do
        grep -q '^ready' "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "$3 failed to start; see $3" >&2; exit 1; }
        sleep 0.5
    done
    echo "not ready in time; see $3" >&2
    exit 1
}

# Free ports, so the demo never collides with a server already running. One after the
# other: the first builds the tiny model the second reuses.
specs=()
for n in 1 2; do
    $BIN/instgenie serve --http-port 0 --grpc-port 0 --metrics-port 0 --health-port 0 --max-sequence-length 32 \
        --log-file "out/server$n.log" > "out/serve$n.txt" &
    pids+=($!)
    wait_ready "out/serve$n.txt" "${pids[-1]}" "out/server$n.log"
    grpc=$(sed -n 's/^grpc: //p' "out/serve$n.txt")
    http=$(sed -n 's/^http: .*://p' "out/serve$n.txt")
    metrics=$(sed -n 's#^metrics: http://.*:\([0-9]*\)/metrics#\1#p' "out/serve$n.txt")
    specs+=("$grpc:$http:$metrics")
    echo "instance $n: grpc $grpc"
done

instances=$(IFS=,; echo "${specs[*]}")
$BIN/instgenie router --instances "$instances" --host 127.0.0.1 --grpc-port 0 --http-port 0 --metrics-port 0 \
    > out/router.txt 2> out/router.log &
pids+=($!)
wait_ready out/router.txt "${pids[-1]}" out/router.log
router=$(sed -n 's/^grpc: //p' out/router.txt)
echo "router (mask_aware): grpc $router"

template=$($BIN/instgenie templates register --url "$router" --image out/template.png --prompt "a photo" --steps 8)
echo "template: $template (registered on both instances)"
$BIN/instgenie edit --url "$router" --template-id "$template" --mask out/mask.png --prompt "a red hat" -o out/edited.png

# The same edit through the router's OpenAI-compatible endpoint (what the `openai`
# package and the playground at $http/ send): multipart in, base64 PNG out.
http=$(sed -n 's/^http: //p' out/router.txt)
curl -sS --fail-with-body "$http/v1/images/edits" -F image=@out/template.png -F mask=@out/mask.png \
    -F prompt="a red hat" -F response_format=b64_json -F template_id="$template" \
    | $BIN/python -c 'import base64, json, sys; open("out/edited_openai.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'
echo "OpenAI-compatible edit: out/edited_openai.png (playground: $http/)"
