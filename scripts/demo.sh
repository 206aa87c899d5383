#!/usr/bin/env bash
# The main job, end to end: a Triton server with the tiny default model, one template
# registered and one edit through the CLI (gRPC, streamed progress). Writes out/edited.png.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p out
$BIN/python bench/sample_inputs.py out

# Free ports, so the demo never collides with a server already running.
$BIN/instgenie serve --http-port 0 --grpc-port 0 --metrics-port 0 --max-sequence-length 32 \
    --log-file out/server.log > out/serve.txt &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
    grep -q '^ready' out/serve.txt 2>/dev/null && break
    kill -0 $server 2>/dev/null || { echo "server failed to start; see out/server.log" >&2; exit 1; }
    sleep 0.5
done
grep -q '^ready' out/serve.txt || { echo "server not ready in time; see out/server.log" >&2; exit 1; }
cat out/serve.txt
grpc=$(sed -n 's/^grpc: //p' out/serve.txt)

template=$($BIN/instgenie templates register --url "$grpc" --image out/template.png --prompt "a photo" --steps 8)
echo "template: $template"
$BIN/instgenie edit --url "$grpc" --template-id "$template" --mask out/mask.png --prompt "a red hat" -o out/edited.png
