#!/usr/bin/env bash
# Makes sure Fashion-MNIST's IDX files are on this machine (Debian package dataset-fashion-mnist).
set -euo pipefail
dir="${CARPRUNE_DATA:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ]; then
  exit 0
fi
if [ -n "${CARPRUNE_DATA:-}" ]; then
  echo "CARPRUNE_DATA=$dir holds no Fashion-MNIST IDX files; put the four *-idx*-ubyte.gz files there or unset it." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get is not available: install Fashion-MNIST's four IDX files yourself and set CARPRUNE_DATA to their folder." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "installing the data needs root: run 'sudo apt-get install dataset-fashion-mnist' (or set CARPRUNE_DATA to a folder with the IDX files)." >&2
  exit 1
fi
echo "installing Debian package dataset-fashion-mnist ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
