#!/usr/bin/env bash
# Install Coral's edgetpu_compiler on x86-64 Debian or Ubuntu from Coral's apt source.
#
# The compiler exists only as an x86-64 Debian package (coral.ai/docs/edgetpu/compiler/,
# "System requirements"); on a Mac, an ARM machine or another Linux use the Docker
# route instead: scripts/compile-docker.sh ARTIFACTS_DIR.
#
# Usage: sudo scripts/install-edgetpu-compiler.sh      (or as root)
set -euo pipefail

KEY_URL="https://packages.cloud.google.com/apt/doc/apt-key.gpg"
REPO_LINE="https://packages.cloud.google.com/apt coral-edgetpu-stable main"
KEYRING="/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg"
SOURCE_LIST="/etc/apt/sources.list.d/coral-edgetpu.list"

die() {
    echo "install-edgetpu-compiler: $*" >&2
    exit 1
}

arch="$(uname -m)"
if [[ "$arch" != "x86_64" ]]; then
    die "this machine is $arch; edgetpu_compiler is published for x86-64 only. Compile in Docker instead: scripts/compile-docker.sh ARTIFACTS_DIR"
fi

if [[ ! -r /etc/os-release ]]; then
    die "/etc/os-release missing: not a Debian/Ubuntu system. Use scripts/compile-docker.sh"
fi
# shellcheck disable=SC1091
. /etc/os-release
if [[ " ${ID:-} ${ID_LIKE:-} " != *" debian "* && " ${ID:-} ${ID_LIKE:-} " != *" ubuntu "* ]]; then
    die "${PRETTY_NAME:-this system} is not Debian-based; Coral ships edgetpu_compiler as a .deb. Use scripts/compile-docker.sh"
fi

if command -v edgetpu_compiler >/dev/null 2>&1; then
    echo "edgetpu_compiler is already installed: $(edgetpu_compiler --version 2>/dev/null || echo 'version unknown')"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "run as root (no sudo available)"
    SUDO="sudo"
fi

echo "Installing prerequisites (curl, gnupg, ca-certificates)..."
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq curl gnupg ca-certificates >/dev/null

echo "Adding Coral's apt signing key to $KEYRING..."
tmp_key="$(mktemp)"
trap 'rm -f "$tmp_key"' EXIT
if ! curl -fsSL "$KEY_URL" -o "$tmp_key"; then
    die "cannot download $KEY_URL (no network, or a proxy blocks packages.cloud.google.com)"
fi
$SUDO gpg --batch --yes --dearmor -o "$KEYRING" "$tmp_key"

echo "Adding Coral's apt source $SOURCE_LIST..."
echo "deb [signed-by=$KEYRING] $REPO_LINE" | $SUDO tee "$SOURCE_LIST" >/dev/null

echo "Installing edgetpu-compiler..."
if ! $SUDO apt-get update -qq; then
    die "apt-get update failed; check $SOURCE_LIST and your network"
fi
$SUDO apt-get install -y edgetpu-compiler

if ! command -v edgetpu_compiler >/dev/null 2>&1; then
    die "edgetpu-compiler installed but edgetpu_compiler is not on PATH"
fi
echo "Installed: $(edgetpu_compiler --version)"
echo "Next: gemma-edge compile ARTIFACTS_DIR"
