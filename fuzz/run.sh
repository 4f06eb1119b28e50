#!/usr/bin/env bash
# Fuzz every target for a while with cargo-fuzz (libFuzzer): path canonicalisation, the
# framing scanner, token and ticket parsing, proxy.toml, the client address behind trusted
# proxies, and the cross-site check (Origin, Referer, Sec-Fetch-Site). Each target's corpus grows in fuzz/corpus/<target>; a crash is saved in
# fuzz/artifacts/<target> and stops the run with a non-zero exit.
#
#   bash fuzz/run.sh                 # 60 s per target
#   SECONDS_EACH=3600 bash fuzz/run.sh path framing
#
# cargo-fuzz wants a nightly compiler; this machine has one stable toolchain, so
# RUSTC_BOOTSTRAP=1 lets stable take nightly's flags. Installs cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(path framing token config forwarded origin)
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
mkdir -p fuzz/logs
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${SECONDS_EACH} s"
  mkdir -p "fuzz/corpus/$target"
  log="fuzz/logs/$target.log"
  cargo fuzz run -O "$target" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 > "$log" 2>&1 || true
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY" "$log" || true
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target crashed; see fuzz/artifacts/$target and $log" >&2
    exit 1
  fi
  if ! grep -q "^Done" "$log"; then
    echo "fuzz: $target did not run; see $log" >&2
    tail -20 "$log" >&2
    exit 1
  fi
done
