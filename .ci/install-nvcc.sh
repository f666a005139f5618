#!/usr/bin/env bash
# Installs nvcc (Debian non-free nvidia-cuda-toolkit) so `--features cuda` compiles.
# No GPU is needed to compile. Idempotent: does nothing when nvcc is on PATH.
set -euo pipefail
command -v nvcc >/dev/null 2>&1 && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && ! grep -q "non-free" "$src"; then
  $SUDO sed -i 's/^Components: main$/Components: main contrib non-free non-free-firmware/' "$src"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends nvidia-cuda-toolkit
nvcc --version | tail -1
