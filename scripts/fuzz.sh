#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ for a bounded time (libFuzzer, nightly).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s for each target in turn
#   FUZZ_SECONDS=600 scripts/fuzz.sh          the same, as a variable
#
# Each target starts from its real seeds (fuzz/corpus-seeds/<target>) and its kept crash
# inputs (fuzz/regressions/<target>), and grows fuzz/corpus/<target> (not committed) from
# one run to the next. A crash, a timeout or an out-of-memory stops that target and is
# kept in fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/ and the stable
# suite replays it through the same check (`cargo test`), fixed or not. Exits 1 if any
# target failed. Installs cargo-fuzz if it is missing; needs the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    seconds=$1
    shift
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "==> the nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# Overflow checks and debug assertions on: a parser's arithmetic is part of what is
# fuzzed. No sanitizer by default: the code under test has no unsafe (the ring, which has,
# is not fuzzed here) and ASan would cost half the executions; FUZZ_SANITIZER=address
# turns it back on.
flags=(--debug-assertions --sanitizer "${FUZZ_SANITIZER:-none}")
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
echo "==> building ${targets[*]}"
cargo +nightly fuzz build "${flags[@]}"

summary=()
failed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    kept=()
    for d in fuzz/corpus-seeds/$t fuzz/regressions/$t; do
        [ -d "$d" ] && kept+=("$d")
    done
    opts=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    case $t in
        # Beyond MAX_CLIENT_HELLO (16 KiB + 5), where the peek must say TooLarge.
        client_hello) opts+=(-max_len=17000) ;;
        meta_json | ctl_create) opts+=(-dict=fuzz/dicts/json.dict) ;;
    esac
    before=$(find "$artifacts" -type f ! -name '*.log' | sort)
    log=$artifacts/last-run.log
    echo "==> fuzzing $t for ${seconds} s (log: $log)"
    status=0
    cargo +nightly fuzz run "${flags[@]}" "$t" "$corpus" "${kept[@]}" -- "${opts[@]}" \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    units=$(find "$corpus" -type f | wc -l)
    new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f ! -name '*.log' | sort) | grep . || true)
    if [ "$status" -eq 0 ] && [ -z "$new" ]; then
        result=ok
    else
        result="FAILED (exit $status)"
        failed=1
        grep -m 20 -E 'panicked at|^==[0-9]+==ERROR|^SUMMARY|Test unit written' "$log" || tail -20 "$log"
        for a in $new; do
            echo "    kept: $a  (keep it: cp $a fuzz/regressions/$t/)"
        done
    fi
    summary+=("$(printf '%-14s %12s runs %8s exec/s %6s corpus  %s' "$t" "${runs:-?}" "${rate:-?}" "$units" "$result")")
done

echo "==> summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
exit $failed
