#!/usr/bin/env bash
# Run socklab's fuzz targets (fuzz/fuzz_targets/) one after another, each for SECONDS
# (default 600), growing its corpus in fuzz/corpus/TARGET, and print per target the
# executions reached, executions per second, corpus size and findings (crash, leak, timeout
# or out-of-memory inputs saved in fuzz/artifacts/TARGET).
#
#   benches/fuzz.sh [SECONDS] [TARGET...]        # e.g. benches/fuzz.sh 1200 http_session
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). It runs on the stable toolchain with
# `--sanitizer none`: the code is safe Rust, so what the targets look for are panics
# (every invariant is an assertion), hangs (-timeout) and runaway memory (-rss_limit_mb).
# After a long run, shrink the corpus before committing it: `cargo fuzz cmin TARGET`.
# `cargo test` replays every committed corpus entry (tests/fuzz_corpus.rs).
# runs no socklab binary: cargo-fuzz builds the targets with the library linked in.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
printf '%-16s %8s %14s %10s %8s %9s\n' target seconds executions exec/s corpus findings
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  before=$(find "fuzz/artifacts/$t" -type f ! -name last-run.log | wc -l)
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
  # One job (the machine is shared); a finding stops that target's run.
  cargo fuzz run --sanitizer none "$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 "${dict[@]}" \
    >"$log/$t.out" 2>&1 || true
  cp "$log/$t.out" "fuzz/artifacts/$t/last-run.log"
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log/$t.out" | grep -o '[0-9]*$' | tail -1)
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log/$t.out" | awk '{print $5}' | tail -1)
  runs=${runs:-0}
  took=${took:-$secs}
  after=$(find "fuzz/artifacts/$t" -type f ! -name last-run.log | wc -l)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  rate=$(( took > 0 ? runs / took : 0 ))
  printf '%-16s %8s %14s %10s %8s %9s\n' "$t" "$took" "$runs" "$rate" "$corpus" "$((after - before))"
  if [ "$after" -gt "$before" ]; then
    grep -A12 -m1 'panicked\|ERROR: libFuzzer' "$log/$t.out" | sed 's/^/    /' || true
  fi
done
