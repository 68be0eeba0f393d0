#!/usr/bin/env bash
# Installs the pinned Claude Code CLI into <dest-dir> with npm. The version is pinned
# exactly because an unpinned install has been seen resolving to a much older release
# (stale registry metadata), and the CLI's stream-json output and request shape change
# between builds. Safe to run again: skips when the pinned version already answers.
set -euo pipefail
version=2.1.330
[ $# -eq 1 ] || { echo "usage: $0 <dest-dir>" >&2; exit 2; }
dest=$1
claude="$dest/node_modules/.bin/claude"

installed() { "$claude" --version 2>/dev/null | grep -qx "$version (Claude Code)"; }

if installed; then
  exit 0
fi
mkdir -p "$dest"
npm install --no-audit --no-fund --prefix "$dest" "@anthropic-ai/claude-code@$version" >&2
# The package's postinstall links the per-platform native binary into bin/; if a
# policy skipped it the wrapper would not run, so check the real thing.
installed || {
  echo "claude $version installed into $dest but '$claude --version' does not print it" >&2
  exit 1
}
