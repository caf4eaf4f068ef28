#!/usr/bin/env bash
# The README's first command. On a fresh Debian or Ubuntu machine that has only a Rust toolchain,
# installs what building tollgate needs and is missing (cmake: pingora builds zlib-ng with it;
# a C compiler and make), then builds tollgate in release mode and runs it with the arguments
# given, from the current directory (so ./config.toml and ./tollgate.db are the ones here):
#
#   ./tollgate.sh serve                  # the gateway on 127.0.0.1:8080
#   ./tollgate.sh keys list              # any other tollgate command
#
# Idempotent: a second run installs nothing. Installing uses apt-get, through sudo when not root.
# TOLLGATE_NO_INSTALL=1 skips the installation (then only the checks run).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v make >/dev/null 2>&1 || need+=(make)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)

if [ ${#need[@]} -gt 0 ]; then
  echo "tollgate.sh: building tollgate needs ${need[*]}" >&2
  if [ "${TOLLGATE_NO_INSTALL:-}" = 1 ]; then
    echo "tollgate.sh: TOLLGATE_NO_INSTALL=1: install them yourself" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tollgate.sh: no apt-get here: install ${need[*]} with your package manager" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "tollgate.sh: not root and no sudo: run as root, or apt-get install ${need[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  echo "tollgate.sh: installing ${need[*]} with apt-get" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  hash -r
  for tool in cmake make cc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "tollgate.sh: $tool is still missing after apt-get install" >&2
      exit 1
    fi
  done
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "tollgate.sh: cargo not found: install a Rust toolchain (https://rustup.rs), 1.85 or newer" >&2
  exit 1
fi

# exec: the process becomes tollgate itself (cargo run execs the binary), so SIGTERM and Ctrl-C
# reach it directly and it shuts down gracefully.
exec cargo run --release --locked --manifest-path "$here/Cargo.toml" -- "$@"
