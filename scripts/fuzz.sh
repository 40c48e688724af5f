#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after the other.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; the targets default to all of them.
# Each target fuzzes fuzz/corpus/<target> (kept between runs, gitignored),
# seeded from fuzz/seeds/<target> (copied in first; the seed files are never
# written). Prints one summary line per target and exits non-zero when any
# target crashed (reproducers land in fuzz/artifacts/<target>/, libFuzzer's
# output in fuzz/logs/<target>.log). See docs/fuzzing.md.
#
# FUZZ_KEEP_GOING=1 keeps fuzzing past a crash (libFuzzer's -fork=1
# -ignore_crashes=1), for a long run while a known crash is still unfixed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
ALL_TARGETS=(config env baggage cookie authority header_map caller)

SECS="${1:-600}"
if [[ $# -gt 0 ]]; then shift; fi
if ! [[ "$SECS" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]   (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
fi
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then TARGETS=("${ALL_TARGETS[@]}"); fi
for t in "${TARGETS[@]}"; do
    if [[ ! -f "$FUZZ/fuzz_targets/$t.rs" ]]; then
        echo "unknown target '$t' (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

# Largest input per target, in bytes: enough for what each parser accepts
# (an env is at most 128 bytes, a host 253), small enough to stay fast.
max_len() {
    case "$1" in
        config) echo 4096 ;;
        env) echo 256 ;;
        authority) echo 512 ;;
        baggage | cookie) echo 1024 ;;
        header_map) echo 2048 ;;
        *) echo 4096 ;;
    esac
}

# --- tools -----------------------------------------------------------------
if ! command -v rustup >/dev/null 2>&1; then
    echo "fuzz.sh needs rustup (cargo-fuzz runs on the nightly toolchain)" >&2
    exit 2
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "== installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd "$ROOT"
echo "== building fuzz targets (cargo +nightly fuzz build)"
# (cargo fuzz build takes one target or none; build all when several.)
if [[ ${#TARGETS[@]} -eq 1 ]]; then
    BUILD=(cargo +nightly fuzz build "${TARGETS[0]}")
else
    BUILD=(cargo +nightly fuzz build)
fi
if ! "${BUILD[@]}" >"$FUZZ/.build.log" 2>&1; then
    cat "$FUZZ/.build.log" >&2
    echo "fuzz build failed" >&2
    exit 2
fi
rm -f "$FUZZ/.build.log"

# --- runs ------------------------------------------------------------------
mkdir -p "$FUZZ/logs"
SUMMARY=()
FAILED=0
artifacts_of() {
    # Crash-like artifacts only (libFuzzer also writes slow-unit-* files).
    find "$FUZZ/artifacts/$1" -maxdepth 1 -type f \
        \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) \
        2>/dev/null | sort
}

for t in "${TARGETS[@]}"; do
    corpus="$FUZZ/corpus/$t"
    seeds="$FUZZ/seeds/$t"
    log="$FUZZ/logs/$t.log"
    times="$FUZZ/logs/$t.time"
    mkdir -p "$corpus" "$seeds" "$FUZZ/artifacts/$t"
    cp -r "$seeds"/. "$corpus"/
    before="$(artifacts_of "$t")"
    len="$(max_len "$t")"
    echo "== fuzz $t: ${SECS}s, -max_len=$len (log: ${log#"$ROOT"/})"

    extra=()
    if [[ "${FUZZ_KEEP_GOING:-0}" == 1 ]]; then extra=(-fork=1 -ignore_crashes=1); fi

    rc=0
    TIMEFORMAT='%U %S'
    { time cargo +nightly fuzz run "$t" "$corpus" "$seeds" -- \
        -max_total_time="$SECS" -max_len="$len" -print_final_stats=1 "${extra[@]}" \
        >"$log" 2>&1; } 2>"$times" || rc=$?

    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    if [[ -z "$execs" ]]; then
        # No final stats (a crash, or fork mode): the last status line's count.
        execs="$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')"
    fi
    execs="${execs:-0}"
    cpu="$(awk '{ printf "%.1f", $1 + $2 }' "$times" 2>/dev/null || echo '?')"
    files="$(find "$corpus" -maxdepth 1 -type f | wc -l | tr -d ' ')"
    after="$(artifacts_of "$t")"
    crashes="$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | grep -c . || true)"
    if [[ $rc -ne 0 && $crashes -eq 0 ]]; then
        # Non-zero exit without an artifact: still a failure worth a look.
        crashes=1
        echo "   (exit $rc without an artifact: see ${log#"$ROOT"/})"
    fi
    if [[ $crashes -gt 0 ]]; then
        FAILED=1
        comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed 's|^|   artifact: |'
    fi
    line="fuzz $t: $execs execs in $cpu s, corpus $files files, crashes $crashes"
    echo "$line"
    SUMMARY+=("$line")
done

echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
