#!/usr/bin/env bash
# The test command (README "Run the tests"): installs what tests need, then cargo test.
# Each .ci/setup.d/*.sh is sourced in order; each is idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
for f in .ci/setup.d/*.sh; do
  [ -e "$f" ] || continue
  # shellcheck disable=SC1090
  source "$f"
done
cargo test --locked "$@"
