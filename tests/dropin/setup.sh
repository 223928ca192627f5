#!/usr/bin/env bash
# Installs the real bot libraries of the drop-in tests (tests/libraries.rs and
# tests/dropin.rs): a venv with the pinned discord.py at tests/dropin/.venv, and the locked discord.js
# in tests/dropin/node/node_modules. Needs python3 and node; installs python3-venv and npm
# from apt when they are missing. Safe to run again; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")"

apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

start=$(date +%s)

# discord.py in a venv. Debian's python3 has no venv/ensurepip without python3-venv.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    rm -rf .venv
    if ! python3 -m venv .venv 2>/dev/null; then
        rm -rf .venv
        echo "setup.sh: python3 -m venv failed; installing python3-venv"
        apt_install python3-venv
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r python/requirements.txt
# The remote-worker example (examples/python/worker.py, tests/broker.rs) uses nats-py.
.venv/bin/python -m pip install --disable-pip-version-check -q -r ../../examples/python/requirements-worker.txt
echo "setup.sh: $(.venv/bin/python -c 'import discord; print("discord.py", discord.__version__)') in tests/dropin/.venv"

# discord.js from the lockfile.
command -v npm >/dev/null || apt_install npm
(cd node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
echo "setup.sh: discord.js $(node -p 'require("./node/node_modules/discord.js/package.json").version') in tests/dropin/node/node_modules"

echo "setup.sh: done in $(( $(date +%s) - start )) s"
