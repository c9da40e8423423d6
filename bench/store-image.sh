#!/usr/bin/env bash
# A big synthetic store for bench/store-scale.sh on a loop-mounted ext4 image, made and torn down here.
#   bench/store-image.sh make IMG MNT N [FROM]   # image IMG mounted at MNT holding files FROM…N-1
#                                                # (FROM > 0 adds to a store made before: grow 1M → 10M)
#   bench/store-image.sh remove IMG MNT          # unmount, delete the image
# Then: DATA=MNT bench/store-scale.sh. The file system has room for 10.5 million inodes, 256-byte
# inodes with inline_data (a 27–35-byte file lives in its inode: 10 million files take ~3.5 GB, not
# the 40 GB of one 4 KiB block each) and no journal (it only slows the generation; the scan reads
# the same readdir + fstatat). Files are written by bench/store-gen.c (compiled here with cc
# -lcrypto), the same bytes and names as store-scale.sh's own generator. Needs root (mount).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?make or remove}; IMG=${2:?image path}; MNT=${3:?mount point}
case $cmd in
make)
  N=${4:?number of files}; FROM=${5:-0}
  if ! mountpoint -q "$MNT"; then
    if [ ! -e "$IMG" ]; then
      truncate -s "${IMG_SIZE:-12G}" "$IMG"
      mkfs.ext4 -q -F -N "${INODES:-10500000}" -I 256 -O inline_data,^has_journal -E lazy_itable_init=1 "$IMG"
    fi
    mkdir -p "$MNT"
    mount -o loop,noatime "$IMG" "$MNT"
  fi
  gen=$(mktemp /tmp/store-gen.XXXXXX)
  cc -O2 -o "$gen" bench/store-gen.c -lcrypto
  start=$(date +%s.%N)
  # Two writers (the machine's cores), interleaved over the same index range.
  "$gen" "$MNT/cas" "$N" "$FROM" 2 & p0=$!
  "$gen" "$MNT/cas" "$N" "$((FROM + 1))" 2 & p1=$!
  wait $p0; wait $p1
  rm -f "$gen"
  echo "wrote files $FROM…$((N - 1)) in $(python3 -c "import time; print(f'{time.time() - $start:.0f}')") s"
  df -h "$MNT"; df -i "$MNT"
  ;;
remove)
  if mountpoint -q "$MNT"; then umount "$MNT"; fi
  rm -f "$IMG"
  ;;
*) echo "usage: $0 make IMG MNT N [FROM] | remove IMG MNT" >&2; exit 2 ;;
esac
