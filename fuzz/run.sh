#!/usr/bin/env bash
# Build and run one libFuzzer target of CacheMesh.
#
#   fuzz/run.sh <target> [SECONDS | -runs=N] [more libFuzzer flags…]
#   fuzz/run.sh gossip 600          # ten minutes
#   fuzz/run.sh grpc -runs=1000000  # a fixed number of executions
#   fuzz/run.sh route 0             # no time limit (until a crash or ^C)
#   fuzz/run.sh http-head crash-…   # replay one input (any path argument is passed through)
#
# Targets: gossip, route, grpc, http-head, h2, qpack. Environment: FUZZ_BUILD=0 skips the build,
# FUZZ_CONFIG=debug builds debug (default release), FUZZ_SCRATCH (default /work/fuzz-build, or
# <repo>/fuzz/.build when /work is not there). Everything runs under `nice -n 19`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${1:?usage: run.sh <gossip|route|grpc|http-head|h2|qpack> [SECONDS|-runs=N] [libFuzzer flags…]}"; shift
case "$target" in
  gossip)    max_len=8192 ;;
  route)     max_len=1024 ;;
  grpc)      max_len=4096 ;;
  http-head) max_len=4096 ;;
  h2)        max_len=8192 ;;
  qpack)     max_len=4096 ;;
  *) echo "unknown target '$target' (gossip, route, grpc, http-head, h2, qpack)" >&2; exit 2 ;;
esac
config="${FUZZ_CONFIG:-release}"
if [[ -z "${FUZZ_SCRATCH:-}" ]]; then
  if [[ -d /work ]]; then FUZZ_SCRATCH=/work/fuzz-build; else FUZZ_SCRATCH="$here/.build"; fi
fi

if [[ "${FUZZ_BUILD:-1}" != 0 ]]; then
  (cd "$here" && nice -n 19 swift build -c "$config" --scratch-path "$FUZZ_SCRATCH" \
      -Xswiftc -sanitize=fuzzer,address --product "fuzz-$target")
fi
bin="$FUZZ_SCRATCH/$config/fuzz-$target"

limit=()
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  [[ "$1" != 0 ]] && limit=(-max_total_time="$1")
  shift
fi

# New inputs go to corpus-work/<target> (ignored by git); the committed seeds are only read.
work="$here/corpus-work/$target"
artifacts="$here/artifacts/$target"
mkdir -p "$work" "$artifacts"
dict=()
[[ -f "$here/dict/$target.dict" ]] && dict=(-dict="$here/dict/$target.dict")

corpora=("$work" "$here/corpus/$target")
for a in "$@"; do [[ -f "$a" ]] && corpora=(); done   # replaying files: no corpus directories

# The Swift runtime's own crash backtracer fights ASan (it hangs reading the stack): let libFuzzer report.
export SWIFT_BACKTRACE="${SWIFT_BACKTRACE:-enable=no}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=0}"
exec nice -n 19 "$bin" -max_len="$max_len" -timeout=20 -rss_limit_mb=3072 -detect_leaks=0 \
  -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" "${limit[@]}" "$@" "${corpora[@]}"
