#!/usr/bin/env bash
# Install and start the systemd unit that runs `gemma-edge serve` at boot (on the board).
#
# Why a script: the unit needs absolute paths (the gemma-edge executable, the deployed
# artifacts, the user's home) that differ per board; this fills them in, checks that
# they exist and that the server's extra is installed, then enables the service.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: install-serve-service.sh [options] ARTIFACTS_DIR

Runs on the board, after scripts/deploy-to-board.sh copied ARTIFACTS_DIR there.
Installs /etc/systemd/system/gemma-edge-serve.service (through sudo), enables it
at boot, starts it and waits until GET /ready answers.

Options:
  --user NAME        account the server runs as (default: the current user)
  --host ADDR        address to bind (default 127.0.0.1; 0.0.0.0 opens it to the
                     network: set GEMMA_EDGE_SERVE_TOKEN in /etc/default/gemma-edge-serve)
  --port N           TCP port (default 8765)
  --gemma-edge PATH  the gemma-edge executable (default: the one on PATH or ~/.local/bin)
  --dry-run          print the unit and the commands instead of running them
  -h, --help         show this help
USAGE
}

die() { printf 'install-serve-service: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'install-serve-service: %s\n' "$*"; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
USER_NAME=$(id -un)
HOST_ADDR=127.0.0.1
PORT=8765
GEMMA_EDGE=""
DRY_RUN=0
POSITIONAL=()
while (($#)); do
  case $1 in
    --user) [[ $# -ge 2 ]] || die "--user needs a name"; USER_NAME=$2; shift ;;
    --host) [[ $# -ge 2 ]] || die "--host needs an address"; HOST_ADDR=$2; shift ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a number"; PORT=$2; shift ;;
    --gemma-edge) [[ $# -ge 2 ]] || die "--gemma-edge needs a path"; GEMMA_EDGE=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
((${#POSITIONAL[@]} == 1)) || { usage >&2; exit 2; }
ART=${POSITIONAL[0]}
[[ -d $ART ]] || die "$ART: no such directory; pass the folder deploy-to-board.sh copied"
[[ -f $ART/manifest.json ]] || die "$ART/manifest.json missing: not a gemma-edge artifacts directory"
ART=$(cd "$ART" && pwd)
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "--port $PORT: not a TCP port"; fi
[[ $ART != *[[:space:]%]* ]] || die "$ART: a path with spaces or % cannot go in the unit; move it"
HOME_DIR=$(getent passwd "$USER_NAME" | cut -d: -f6) || die "no such user: $USER_NAME"
[[ -n $HOME_DIR ]] || die "no home folder for user $USER_NAME"

if [[ -z $GEMMA_EDGE ]]; then
  GEMMA_EDGE=$(command -v gemma-edge || true)
  [[ -n $GEMMA_EDGE ]] || GEMMA_EDGE=$HOME_DIR/.local/bin/gemma-edge
fi
[[ -x $GEMMA_EDGE ]] || die "$GEMMA_EDGE: no gemma-edge executable; install it (scripts/setup-devboard.sh) or pass --gemma-edge"
GEMMA_EDGE=$(cd "$(dirname "$GEMMA_EDGE")" && pwd)/$(basename "$GEMMA_EDGE")
PYTHON=$(head -n 1 "$GEMMA_EDGE" | sed -n 's/^#![[:space:]]*//p')
if [[ -n $PYTHON && $DRY_RUN == 0 ]]; then
  "$PYTHON" -c "import starlette, uvicorn" 2>/dev/null \
    || die "the server's packages are missing for $PYTHON: $PYTHON -m pip install --user 'gemma-edge[serve]' (starlette, uvicorn)"
fi

UNIT=$(sed -e "s|@USER@|$USER_NAME|g" -e "s|@HOME@|$HOME_DIR|g" -e "s|@GEMMA_EDGE@|$GEMMA_EDGE|g" \
  -e "s|@ARTIFACTS@|$ART|g" -e "s|@DOCS@|$HERE/README.md|g" "$HERE/gemma-edge-serve.service")
DEFAULTS="GEMMA_EDGE_HOST=$HOST_ADDR
GEMMA_EDGE_PORT=$PORT"

if ((DRY_RUN)); then
  printf '%s\n' "$UNIT"
  note "would write /etc/systemd/system/gemma-edge-serve.service and /etc/default/gemma-edge-serve:"
  printf '%s\n' "$DEFAULTS"
  note "would run: systemctl daemon-reload; systemctl enable --now gemma-edge-serve"
  exit 0
fi

command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this system does not run systemd"
SUDO=""
[[ $(id -u) == 0 ]] || SUDO=sudo
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf '%s\n' "$UNIT" >"$tmp"
$SUDO install -m 0644 "$tmp" /etc/systemd/system/gemma-edge-serve.service
if [[ -f /etc/default/gemma-edge-serve ]]; then
  note "keeping /etc/default/gemma-edge-serve (edit it to change the port, address or token)"
else
  printf '%s\n' "$DEFAULTS" >"$tmp"
  $SUDO install -m 0600 "$tmp" /etc/default/gemma-edge-serve
fi
$SUDO systemctl daemon-reload
$SUDO systemctl enable --now gemma-edge-serve
$SUDO systemctl restart gemma-edge-serve  # picks up new artifacts on a re-install

note "waiting for http://127.0.0.1:$PORT/ready (the first start packs the weights: minutes)"
for _ in $(seq 1 600); do
  if "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$PORT/ready', timeout=2)" 2>/dev/null; then
    note "ready: curl http://127.0.0.1:$PORT/v1/embeddings -H 'Content-Type: application/json' -d '{\"input\": \"hello\"}'"
    exit 0
  fi
  systemctl is-failed --quiet gemma-edge-serve && die "the service failed: journalctl -u gemma-edge-serve -n 50"
  sleep 1
done
die "not ready after 10 minutes: journalctl -u gemma-edge-serve -n 50"
