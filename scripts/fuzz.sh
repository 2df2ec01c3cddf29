#!/usr/bin/env bash
# Fuzzes every file parser with the toolchain's libFuzzer (make fuzz).
#   FUZZ_SECONDS=180   seconds per target
#   FUZZ_TARGETS="gguf png"   a subset (default: all of TTRV.FuzzEntry.targets)
#   FUZZ_NO_BUILD=1   use the fuzzer binary already built (e.g. for a second, parallel run)
# Crashes, timeouts and out-of-memory inputs are written to Tests/Fixtures/fuzz/<target>/, which
# the tests replay (FuzzRegressionTests); the growing corpus lives in .build/fuzz-work/<target>/.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-180}
TARGETS=${FUZZ_TARGETS:-"gguf safetensors torch-checkpoint pickle tokenizer config-llama config-qwen25vl
  config-internvl config-composed png jpeg idx dataset chat-template"}
BUILD=.build/fuzz
BIN=$BUILD/release/ttrv-fuzz
WORK=.build/fuzz-work
F=Tests/Fixtures

# Every module instrumented for coverage and ASan; FUZZING drops the replay main so that
# libFuzzer's main is the program's.
build() {
    nice -n 10 swift build -c release --build-path "$BUILD" --product ttrv-fuzz \
        --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING
}
# With `--sanitize` alone, SwiftPM 6.3 sometimes compiled the Swift modules without coverage counters
# (libFuzzer then runs blind), hence the explicit -Xswiftc flags and this check; the parsers alone
# have over 10,000 counters.
counters() {
    local hex
    hex=$(objdump -h "$BIN" | awk '$2 == "__sancov_cntrs" {print $3}')
    echo $((16#${hex:-0}))
}
if [ -z "${FUZZ_NO_BUILD:-}" ]; then
    build || exit 1
    if [ "$(counters)" -lt 10000 ]; then
        echo "the incremental build lost coverage instrumentation; building $BUILD from scratch"
        rm -rf "$BUILD"
        build || exit 1
    fi
fi
[ "$(counters)" -ge 10000 ] || { echo "$BIN is not instrumented for coverage"; exit 1; }
# The targets run a copy, so that a concurrent build cannot swap the binary between targets.
mkdir -p "$WORK"
cp "$BIN" "$WORK/ttrv-fuzz.$$"
BIN=$WORK/ttrv-fuzz.$$
trap 'rm -f "$BIN"' EXIT

# Small inputs only: libFuzzer mutates faster and finds more from short seeds.
seeds() {
    local t=$1 out=$2
    case $t in
    gguf) cp $F/gguf/fixture.gguf "$out" ;;
    safetensors) cp $F/ckpt/st_python.safetensors "$out" ;;
    torch-checkpoint) cp $F/ckpt/*.pt $F/hostile/*.pt "$out" ;;
    pickle)
        for z in $F/ckpt/torch_zip.pt $F/ckpt/torch_wrapped_zip.pt $F/hostile/*.pt; do
            unzip -p "$z" '*/data.pkl' > "$out/$(basename "$z" .pt).pkl" 2>/dev/null || rm -f "$out/$(basename "$z" .pt).pkl"
        done ;;
    tokenizer) cp $F/tokenizer/qwen2/tokenizer.json "$out/qwen2.json"; cp $F/internvl/remote/tokenizer.json "$out/internvl.json" ;;
    config-llama) cp $F/lm/tiny-llama/config.json "$out/llama.json"; cp $F/lm/tiny-qwen2/config.json "$out/qwen2.json" ;;
    config-qwen25vl) cp $F/qwen25vl/config.json $F/qwen25vl/config_v5.json $F/qwen25vl/preprocessor_config.json "$out" ;;
    config-internvl) cp $F/internvl/tiny/config.json "$out/tiny.json"; cp $F/internvl/remote/config.json "$out/remote.json" ;;
    config-composed) cp models/default-vlm/config.json "$out" ;;
    png) find $F/images -name '*.png' -size -4k -exec cp {} "$out" \; ;;
    jpeg) find $F/images -name '*.jpg' -size -4k -exec cp {} "$out" \; ;;
    idx)
        printf '\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02abcdefgh' > "$out/cube.idx"
        printf '\x00\x00\x08\x01\x00\x00\x00\x03xyz' > "$out/labels.idx"
        gzip -c "$out/cube.idx" > "$out/cube.idx.gz" ;;
    dataset) cp $F/ttrv/rows.json $F/ttrv/rows.jsonl "$out" ;;
    chat-template) cp $F/chat_templates/*.jinja "$out"; cp $F/internvl/tiny/chat_template.jinja "$out/internvl_tiny.jinja" ;;
    esac
}

dict() {
    case $1 in
    gguf | safetensors | png | jpeg | pickle | torch-checkpoint) echo "-dict=scripts/fuzz/$1.dict" ;;
    tokenizer | config-* | dataset) echo "-dict=scripts/fuzz/json.dict" ;;
    chat-template) echo "-dict=scripts/fuzz/jinja.dict" ;;
    esac
}

summary=$WORK/summary.txt
mkdir -p "$WORK"
echo "# $(date -u +%FT%TZ), $SECONDS_PER_TARGET s per target" >> "$summary"
found=0
for t in $TARGETS; do
    rm -rf "$WORK/$t/seeds"
    mkdir -p "$WORK/$t/seeds" "$WORK/$t/corpus" "$F/fuzz/$t"
    seeds "$t" "$WORK/$t/seeds"
    before=$(ls "$F/fuzz/$t" | wc -l)
    echo "== $t: $SECONDS_PER_TARGET s"
    TTRV_FUZZ_TARGET=$t ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=0 nice -n 10 "$BIN" \
        "$WORK/$t/corpus" "$WORK/$t/seeds" "$F/fuzz/$t" $(dict "$t") \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -artifact_prefix="$F/fuzz/$t/" -print_final_stats=1 > "$WORK/$t/log.txt" 2>&1
    rc=$?
    runs=$(awk '/stat::number_of_executed_units:/ {print $2}' "$WORK/$t/log.txt")
    rate=$(awk '/stat::average_exec_per_sec:/ {print $2}' "$WORK/$t/log.txt")
    new=$(( $(ls "$F/fuzz/$t" | wc -l) - before ))
    [ "$new" -gt 0 ] && found=1
    line="$t: exit $rc, ${runs:-?} executions, ${rate:-?} exec/s, $new new crash input(s)"
    echo "$line" | tee -a "$summary"
done
echo "summary in $summary"
if [ "$found" -ne 0 ]; then
    echo "new crash inputs under $F/fuzz/: fix them and commit the inputs"
    exit 1
fi
