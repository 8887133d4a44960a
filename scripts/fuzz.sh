#!/bin/bash
# Coverage-guided fuzzing of ext2-rs with AFL++ (cargo-afl, stable Rust),
# in process over the in-memory device (fuzz/, see tests/fuzz/README.md).
#
#     scripts/fuzz.sh                    # lists the targets, one per line
#     scripts/fuzz.sh TARGET SECONDS     # fuzzes TARGET from fuzz/corpus/TARGET
#
# Exits non-zero on a crash (a panic, an abort, a signal), a hang (AFL's
# timeout, FUZZ_TIMEOUT_MS, default 2000, that the input still exceeds when
# run again alone) or a leak: at the end the
# committed corpus and up to FUZZ_LEAK_INPUTS (default 30) of the inputs
# found run once more under valgrind's memcheck, which must report no
# error and no memory definitely lost (see "Leaks" in the README).
#
# For `write`, every image AFL kept that e2fsck -fn passes before its
# requests must pass after them (fuzz/target/release/replay --e2fsck).
#
# FUZZ_RESUME=1 resumes the run in FUZZ_OUT instead of starting afresh.
# Findings stay in FUZZ_OUT (default fuzz/target/afl/TARGET): crashes/ and
# hangs/ under default/, fuzzer_stats for executions per second and edges.
# Installs cargo-afl (`cargo install cargo-afl`) when it is missing. The
# fuzzer is told to ignore the host's core_pattern and CPU frequency
# scaling (AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES, AFL_SKIP_CPUFREQ) and not
# to bind a CPU (AFL_NO_AFFINITY): no system setting is changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
targets=(read journal quota quota-tree write)

if [ $# -eq 0 ]; then
    printf '%s\n' "${targets[@]}"
    exit 0
fi
if [ $# -ne 2 ] || ! printf '%s\n' "${targets[@]}" | grep -qx -- "$1" ||
    ! [[ $2 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [TARGET SECONDS]   (targets: ${targets[*]})" >&2
    exit 2
fi
target=$1 seconds=$2
out=${FUZZ_OUT:-$fuzz/target/afl/$target}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$fuzz/target}"

if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-afl" >&2
    cargo install cargo-afl
fi
for tool in valgrind mke2fs; do
    command -v "$tool" >/dev/null || {
        echo "fuzz.sh: $tool is missing (apt-get install valgrind e2fsprogs)" >&2
        exit 1
    }
done

cd "$fuzz"
# Instrumented for AFL (with debug assertions and overflow checks, as
# cargo-afl builds), and plain for the leak check.
cargo afl build --release --features afl --bin fuzz-afl
cargo build --release --bin replay

# FUZZ_RESUME=1 goes on from the inputs a previous run in FUZZ_OUT kept.
input="corpus/$target"
if [ "${FUZZ_RESUME:-0}" = 1 ] && [ -d "$out/default/queue" ]; then
    input=-
    export AFL_AUTORESUME=1
else
    rm -rf "$out"
fi
mkdir -p "$out"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_NO_UI=1 AFL_SKIP_CRASHES=0
export AFL_FORKSRV_INIT_TMOUT=${AFL_FORKSRV_INIT_TMOUT:-60000}
cargo afl fuzz -V "$seconds" -t "${FUZZ_TIMEOUT_MS:-2000}" -i "$input" -o "$out" \
    -- "$CARGO_TARGET_DIR/release/fuzz-afl" "$target" >>"$out/afl.log" 2>&1 || {
    tail -30 "$out/afl.log" >&2
    echo "fuzz.sh: afl-fuzz failed (log: $out/afl.log)" >&2
    exit 1
}

stats="$out/default/fuzzer_stats"
if [ -f "$stats" ]; then
    grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|edges_found|total_edges|bitmap_cvg|saved_crashes|saved_hangs) ' "$stats"
fi
status=0
found() { find "$out/default/$1" -name 'id:*' 2>/dev/null | sort; }
crashes=$(found crashes)
hangs=$(found hangs)
if [ -n "$crashes" ]; then
    echo "fuzz.sh: $target: crashes (replay one with fuzz/target/release/replay $target FILE):" >&2
    echo "$crashes" >&2
    status=1
fi
# A hang AFL saved is run again, alone: on a loaded machine (nice 19 among
# other jobs) a fuzzer can be descheduled past the timeout.  Only an input
# that still takes longer is one.
timeout_s=$(( (${FUZZ_TIMEOUT_MS:-2000} + 999) / 1000 ))
for hang in $hangs; do
    if timeout "$timeout_s" "$CARGO_TARGET_DIR/release/fuzz-afl" "$target" <"$hang" >/dev/null 2>&1; then
        echo "fuzz.sh: $target: $hang runs in time alone (the machine stalled): not a hang" >&2
    else
        echo "fuzz.sh: $target: hang (over ${FUZZ_TIMEOUT_MS:-2000} ms, again alone): $hang" >&2
        status=1
    fi
done

# The write target's promise: an image e2fsck -fn passes before the
# requests still passes after them (every input AFL kept; images that do
# not stay in $out/e2fsck).
if [ "$target" = write ] && ! "$CARGO_TARGET_DIR/release/replay" --e2fsck "$out/e2fsck" \
    "corpus/$target" "$out/default/queue"; then
    echo "fuzz.sh: $target: images e2fsck passed before the writes fail after (in $out/e2fsck)" >&2
    status=1
fi

# Leaks: the corpus and the newest inputs found, once, under memcheck.
leak_inputs=("corpus/$target")
while IFS= read -r input; do
    leak_inputs+=("$input")
done < <(find "$out/default/queue" -maxdepth 1 -name 'id:*' -printf '%T@ %p\n' 2>/dev/null |
    sort -rn | head -n "${FUZZ_LEAK_INPUTS:-30}" | cut -d' ' -f2-)
if ! valgrind -q --tool=memcheck --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=99 --log-file="$out/valgrind.log" \
    "$CARGO_TARGET_DIR/release/replay" "$target" "${leak_inputs[@]}"; then
    cat "$out/valgrind.log" >&2
    echo "fuzz.sh: $target: memcheck found errors or leaks (log: $out/valgrind.log)" >&2
    status=1
fi
[ $status -eq 0 ] && echo "fuzz.sh: $target: no crash, hang or leak in $seconds s"
exit $status
