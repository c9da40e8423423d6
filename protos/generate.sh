#!/usr/bin/env bash
# Regenerates Sources/REAPI/Generated/*.pb.swift from the .proto files in
# protos/. Run by hand after editing a .proto; never run in CI (the generated
# Swift is committed).
#
# Needs:
#   * protoc (Debian: `apt-get install protobuf-compiler libprotobuf-dev`;
#     generated with libprotoc 3.21.12). The google/protobuf/*.proto
#     well-known types come from protoc's include dir (/usr/include).
#   * protoc-gen-swift built from swift-protobuf at the SAME version the
#     package resolves (1.39.0), e.g. in a scratch package outside the repo:
#       mkdir -p /tmp/pgs/Sources/Dummy && cd /tmp/pgs
#       echo 'import SwiftProtobuf' > Sources/Dummy/d.swift
#       cat > Package.swift <<'PKG'
#       // swift-tools-version:6.0
#       import PackageDescription
#       let package = Package(name: "PGS",
#         dependencies: [.package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0")],
#         targets: [.target(name: "Dummy", dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")])])
#       PKG
#       nice -n 10 swift build -c release --product protoc-gen-swift
#     then pass PROTOC_GEN_SWIFT=/tmp/pgs/.build/release/protoc-gen-swift
#     (or put it on PATH).
#
# Usage: protos/generate.sh   (from anywhere)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="$root/Sources/REAPI/Generated"

PROTOC="${PROTOC:-protoc}"
PROTOC_GEN_SWIFT="${PROTOC_GEN_SWIFT:-$(command -v protoc-gen-swift || true)}"
WKT_INCLUDE="${WKT_INCLUDE:-/usr/include}"

if [ -z "$PROTOC_GEN_SWIFT" ] || [ ! -x "$PROTOC_GEN_SWIFT" ]; then
  echo "protoc-gen-swift not found: set PROTOC_GEN_SWIFT (see comments in $0)" >&2
  exit 1
fi
if [ ! -f "$WKT_INCLUDE/google/protobuf/any.proto" ]; then
  echo "google/protobuf/*.proto not under $WKT_INCLUDE: set WKT_INCLUDE" >&2
  exit 1
fi
echo "using $("$PROTOC" --version), $("$PROTOC_GEN_SWIFT" --version)"

cd "$here"
protos=(
  build/bazel/semver/semver.proto
  build/bazel/remote/execution/v2/remote_execution.proto
  google/bytestream/bytestream.proto
  google/rpc/code.proto
  google/rpc/status.proto
)

rm -rf "$out"
mkdir -p "$out"
# Messages and enums only: protoc-gen-swift never emits service stubs.
# Well-known types (Any, Duration, Timestamp, wrappers) map to the
# SwiftProtobuf module automatically.
"$PROTOC" \
  -I "$here" -I "$WKT_INCLUDE" \
  --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" \
  --swift_out="$out" \
  --swift_opt=Visibility=Public \
  --swift_opt=FileNaming=PathToUnderscores \
  "${protos[@]}"

ls -1 "$out"
