#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each), starting
# from the committed seeds. Works on the stable toolchain: cargo-fuzz's -Z
# flags are allowed with RUSTC_BOOTSTRAP=1, and no sanitizer is needed for
# safe Rust. A crash leaves its input under fuzz/artifacts/ and fails.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
for target in payload job_decode; do
    mkdir -p "corpus/$target"
    cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
    echo "== fuzzing $target for ${seconds}s"
    cargo fuzz run --sanitizer none "$target" "corpus/$target" -- -max_total_time="$seconds" 2>&1 | tail -n 3
done
