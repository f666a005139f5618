# Sourced by scripts/test.sh: nasm assembles libjpeg-turbo's SIMD code, which the
# `mozjpeg-sys` crate builds from source (sdkit decodes JPEG with it, as Pillow does).
# Debian/Ubuntu package `nasm`; quick when present.
if ! command -v nasm >/dev/null 2>&1; then
  _sudo=""; [ "$(id -u)" -ne 0 ] && _sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -q nasm >/dev/null 2>&1 ||
    { $_sudo apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -q nasm; }
  unset _sudo
fi
