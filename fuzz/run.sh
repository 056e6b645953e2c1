#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each for FUZZ_SECONDS (default 600), one after
# another, one libFuzzer process at a time; writes libFuzzer's final numbers per target to
# fuzz/last-run.txt. Used by `make fuzz`; see fuzz/README.md.
#
#   fuzz/run.sh [TARGET...]            default: ctrl queue_pair mmio pci api
#   FUZZ_SECONDS=60 fuzz/run.sh ctrl
#   FUZZ_MERGE=1 fuzz/run.sh           afterwards, re-minimise fuzz/corpus/<target>
#   FUZZ_SECONDS=0 FUZZ_MERGE=1 fuzz/run.sh   only re-minimise (no fuzzing, no new stats)
#
# The growing corpus, logs and crash artifacts live under $MQVMM_BUILD/fuzz (build/fuzz),
# outside git; the committed seeds in fuzz/corpus/<target> are only read (merged in).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
seconds=${FUZZ_SECONDS:-600}
build=${MQVMM_BUILD:-$root/build}
tools=$build/tools
work=$build/fuzz
targets=("$@")
all_targets=(ctrl queue_pair mmio pci api)
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# cargo-fuzz, installed once into the build cache.
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
    echo "fuzz: installing cargo-fuzz into $tools"
    cargo install cargo-fuzz --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, sancov passes); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1 (its rust-std ships the ASan runtime).
export RUSTC_BOOTSTRAP=1
target_dir=$here/target
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release

cd "$root"
# -a: debug assertions, so arithmetic overflow in guest-reachable code is a crash too.
cargo fuzz build -a --target-dir "$target_dir"
for t in "${targets[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "fuzz: target $t was not built" >&2; exit 1; }
done

# One line per target; a run replaces the lines of the targets it ran and keeps the others.
summary=$here/last-run.txt
mkdir -p "$work"
: > "$work/last-run.lines"

failed=0
for t in "${targets[@]}"; do
    corpus=$work/corpus/$t
    artifacts=$work/artifacts/$t
    logs=$work/logs/$t
    mkdir -p "$corpus" "$artifacts" "$logs"
    cp -n "$here/corpus/$t/"* "$corpus/" 2>/dev/null || true
    if [ "$seconds" != 0 ]; then
        before=$(ls "$artifacts" | wc -l)
        echo "fuzz: $t for ${seconds} s (log: $logs/fuzz-0.log)"
        rm -f "$logs/fuzz-0.log"
        # -jobs=1 runs one fuzzing process whose output goes to fuzz-0.log in the cwd.
        (cd "$logs" && "$bin_dir/$t" -workers=1 -jobs=1 -max_total_time="$seconds" -timeout=60 \
            -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus") \
            > "$logs/master.log" 2>&1 || true
        log=$logs/fuzz-0.log
        after=$(ls "$artifacts" | wc -l)
        last=$(grep -E '^#[0-9]+\s' "$log" | tail -1 || true)
        execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
        rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
        cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | grep -oE '[0-9]+' || echo '?')
        ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | grep -oE '[0-9]+' || echo '?')
        corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' <<<"$last" | sed 's/corp: //' || echo '?')
        rss=$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
        took=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' || echo '?')
        if [ "$after" -gt "$before" ] || grep -qE 'ERROR: libFuzzer|panicked at' "$log"; then
            result="CRASH: $artifacts/$(ls -t "$artifacts" | head -1) (see $log)"
            failed=1
        else
            result="ok, no crash"
        fi
        line="$t: ${took} s, ${execs} execs (${rate}/s), cov: ${cov} ft: ${ft}, corpus ${corp}, peak RSS ${rss} MB: ${result} [$(date -u +%Y-%m-%dT%H:%MZ)]"
        echo "fuzz: $line"
        echo "$line" >> "$work/last-run.lines"
    fi
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        fresh=$work/merged/$t
        rm -rf "$fresh" && mkdir -p "$fresh"
        "$bin_dir/$t" -set_cover_merge=1 -timeout=60 "$fresh" "$here/corpus/$t" "$corpus" > "$logs/merge.log" 2>&1
        # A seed kept by the merge comes back named by its SHA-1; keep only the seed-* copy.
        for seed in "$here/corpus/$t"/seed-*; do
            rm -f "$fresh/$(sha1sum < "$seed" | cut -d' ' -f1)"
        done
        find "$here/corpus/$t" -type f ! -name 'seed-*' -delete
        cp -n "$fresh/"* "$here/corpus/$t/" 2>/dev/null || true
        echo "fuzz: $t corpus minimised to $(find "$here/corpus/$t" -type f | wc -l) files"
    fi
done
if [ "$seconds" != 0 ]; then
    {
        echo "# make fuzz: libFuzzer's final numbers per target (-workers=1 -jobs=1, debug assertions, ASan)"
        echo "# machine: $(nproc) cores; rustc: $(rustc -V | cut -d' ' -f2); $(cargo fuzz --version 2>/dev/null || echo 'cargo-fuzz ?')"
        for t in "${all_targets[@]}"; do
            grep -h "^$t: " "$work/last-run.lines" 2>/dev/null ||
                grep -h "^$t: " "$summary" 2>/dev/null || true
        done
    } > "$work/last-run.txt"
    cp "$work/last-run.txt" "$summary"
    echo "fuzz: summary in $summary"
fi
exit "$failed"
