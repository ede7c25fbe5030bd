#!/usr/bin/env bash
# Set up a Coral Dev Board (Mendel Linux) to run gemma-edge on its Edge TPU.
#
# Installs Coral's Python runtime (python3-pycoral, python3-tflite-runtime) and
# the Edge TPU runtime (libedgetpu1-std, or libedgetpu1-max with --max) from
# Coral's apt repository, which Mendel has configured already, then pip-installs
# the device side of gemma-edge: numpy, sentencepiece and the project itself
# without extras (no torch, no transformers). Safe to re-run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: setup-devboard.sh [options]

Run on the Coral Dev Board (Mendel Linux) as the mendel user; apt runs via sudo.

Options:
  --max            install libedgetpu1-max: faster, but the Edge TPU runs HOT
                   and needs the fan (asks for confirmation)
  --std            install libedgetpu1-std (default)
  --yes            confirm --max without asking
  --project PATH   gemma-edge source folder or wheel to pip install
                   (default: the checkout this script belongs to)
  --no-project     do not install gemma-edge itself
  --sqlite-vec     also pip install sqlite-vec (optional; faster search)
  --dry-run        print the commands instead of running them
  -h, --help       show this help
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=$(dirname "$SCRIPT_DIR")
MENDEL_FILE=${GEMMA_EDGE_MENDEL_FILE:-/etc/mendel_version}
APEX_DEVICE=${GEMMA_EDGE_APEX_DEVICE:-/dev/apex_0}
PY=${PYTHON:-python3}
RUNTIME=libedgetpu1-std
YES=0
DRY=0
INSTALL_PROJECT=1
SQLITE_VEC=0

die() { printf 'setup-devboard: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'setup-devboard: %s\n' "$*"; }
run() { if ((DRY)); then printf '+ %s\n' "$*"; else "$@"; fi; }
as_root() { if [[ $(id -u) -eq 0 ]]; then run "$@"; else run sudo "$@"; fi; }

while (($#)); do
  case $1 in
    --max) RUNTIME=libedgetpu1-max ;;
    --std) RUNTIME=libedgetpu1-std ;;
    --yes|-y) YES=1 ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a path"; PROJECT=$2; shift ;;
    --no-project) INSTALL_PROJECT=0 ;;
    --sqlite-vec) SQLITE_VEC=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

confirm_max() {
  cat >&2 <<'EOF'
WARNING: libedgetpu1-max runs the Edge TPU at its maximum clock. Inference is
faster, but the chip and its heat sink get HOT to the touch, and without
cooling the board throttles or can be damaged. Keep the Dev Board's fan
connected and running. (The Dev Board Mini has no fan: stay with -std there.)
EOF
  ((YES)) && return 0
  [[ -t 0 ]] || die "--max needs confirmation: re-run with --max --yes, or interactively"
  local answer
  read -r -p "Install libedgetpu1-max anyway? Type yes to continue: " answer
  [[ $answer == yes ]] || die "not confirmed; nothing installed (the default is libedgetpu1-std)"
}

# -- checks ------------------------------------------------------------------------
[[ -f $MENDEL_FILE ]] || die "$MENDEL_FILE not found: this is not Mendel Linux. On a Raspberry \
Pi or a PC with a USB Accelerator run scripts/setup-usb-accelerator.sh instead"
note "Mendel Linux $(head -n 1 "$MENDEL_FILE")"
[[ -e $APEX_DEVICE ]] || die "$APEX_DEVICE not found: the Edge TPU's PCIe driver (apex) is not \
loaded. Update Mendel (sudo apt-get update && sudo apt-get dist-upgrade), reboot and re-run; \
if it is still missing, reflash the board"
if [[ ! -r $APEX_DEVICE || ! -w $APEX_DEVICE ]]; then
  note "WARNING: $(id -un) cannot open $APEX_DEVICE; add the user to the apex group \
(sudo usermod -aG apex $(id -un)) and log in again"
fi
if [[ $INSTALL_PROJECT -eq 1 && ! -e $PROJECT ]]; then
  die "$PROJECT: no such project folder or wheel; pass --project PATH or --no-project"
fi
if [[ $RUNTIME == libedgetpu1-max ]]; then
  confirm_max
fi

# -- Coral packages (Coral's apt repository is preconfigured on Mendel) --------------
as_root apt-get update
if [[ $RUNTIME == libedgetpu1-max ]]; then
  # the package asks the same question interactively; it was confirmed above
  if ((DRY)); then
    printf '+ %s\n' "echo 'libedgetpu1-max libedgetpu/accepted-eula boolean true' | debconf-set-selections"
  else
    echo "libedgetpu1-max libedgetpu/accepted-eula boolean true" | as_root debconf-set-selections
  fi
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y \
  "$RUNTIME" python3-pycoral python3-tflite-runtime python3-pip

# -- Python packages (user site: Mendel's system Python is 3.7) ----------------------
# pip 24.0 is the last pip for Python 3.7; older pips cannot build a pyproject.toml project
run "$PY" -m pip install --user --upgrade "pip<24.1"
run "$PY" -m pip install --user numpy sentencepiece
if ((SQLITE_VEC)); then
  run "$PY" -m pip install --user sqlite-vec || note "WARNING: sqlite-vec did not install; \
search falls back to an exact numpy scan"
fi
if ((INSTALL_PROJECT)); then
  run "$PY" -m pip install --user "$PROJECT"
fi

# -- verify --------------------------------------------------------------------------
run "$PY" -c "from pycoral.utils.edgetpu import list_edge_tpus as l; t = l(); print('Edge TPUs:', t); raise SystemExit(0 if t else 1)" \
  || die "pycoral sees no Edge TPU although $APEX_DEVICE exists; reboot the board and re-run"
if ((INSTALL_PROJECT)); then
  run "$PY" -m gemma_edge.cli --help >/dev/null || die "gemma-edge did not install; see pip's output above"
  case ":$PATH:" in
    *":$HOME/.local/bin:"*) ;;
    *) note "add ~/.local/bin to PATH (or log in again) to run \`gemma-edge\`" ;;
  esac
fi
note "done: $RUNTIME, pycoral, tflite-runtime$( ((INSTALL_PROJECT)) && echo ", gemma-edge")."
note "next: copy artifacts with scripts/deploy-to-board.sh (on your workstation), then run"
note "      scripts/run-on-board.sh ARTIFACTS_DIR here"
