#!/usr/bin/env bash
# Debian packages carprune needs: Fashion-MNIST's IDX files (always) and, with --test, Chromium
# for the report's screenshot test. Installs only what is missing.
set -euo pipefail
need=()
dir="${CARPRUNE_DATA:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$dir/train-images-idx3-ubyte.gz" ] && [ ! -f "$dir/train-images-idx3-ubyte" ]; then
  if [ -n "${CARPRUNE_DATA:-}" ]; then
    echo "CARPRUNE_DATA=$dir holds no Fashion-MNIST IDX files; put the four *-idx*-ubyte.gz files there or unset it." >&2
    exit 1
  fi
  need+=(dataset-fashion-mnist)
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get is not available: install ${need[*]} yourself (for the data, set CARPRUNE_DATA to a folder with Fashion-MNIST's four IDX files)." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "installing ${need[*]} needs root: run 'sudo apt-get install ${need[*]}' (or set CARPRUNE_DATA to a folder with the IDX files)." >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]} ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
