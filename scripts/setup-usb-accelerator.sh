#!/usr/bin/env bash
# Set up a Debian, Ubuntu or Raspberry Pi OS host for a Coral USB Accelerator.
#
# Adds Coral's apt repository, installs the Edge TPU runtime (libedgetpu1-std,
# or libedgetpu1-max with --max), a Python TFLite runtime (tflite-runtime or
# ai-edge-litert, whichever has wheels for this Python and CPU) and optionally
# the device side of gemma-edge, then checks that the accelerator is visible.
# Safe to re-run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: setup-usb-accelerator.sh [options]

Run as your normal user; apt runs via sudo.

Options:
  --max              install libedgetpu1-max: faster, but the accelerator gets
                     HOT (asks for confirmation)
  --std              install libedgetpu1-std (default)
  --yes              confirm --max without asking
  --runtime NAME     auto (default) | tflite-runtime | ai-edge-litert | none
  --venv DIR         pip-install into this venv (created if missing); the default
                     is pip --user, or ~/gemma-edge-venv where pip --user is not
                     allowed (PEP 668: Debian 12, Raspberry Pi OS Bookworm)
  --project PATH     also pip install gemma-edge from this folder or wheel
  --require-device   exit 1 when no Edge TPU is plugged in
  --dry-run          print the commands instead of running them
  -h, --help         show this help
EOF
}

APT_LIST=/etc/apt/sources.list.d/coral-edgetpu.list
KEYRING=/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg
KEY_URL=https://packages.cloud.google.com/apt/doc/apt-key.gpg
PY=${PYTHON:-python3}
RUNTIME=libedgetpu1-std
PY_RUNTIME=auto
VENV=""
PROJECT=""
YES=0
DRY=0
REQUIRE_DEVICE=0

die() { printf 'setup-usb-accelerator: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'setup-usb-accelerator: %s\n' "$*"; }
run() { if ((DRY)); then printf '+ %s\n' "$*"; else "$@"; fi; }
as_root() { if [[ $(id -u) -eq 0 ]]; then run "$@"; else run sudo "$@"; fi; }

while (($#)); do
  case $1 in
    --max) RUNTIME=libedgetpu1-max ;;
    --std) RUNTIME=libedgetpu1-std ;;
    --yes|-y) YES=1 ;;
    --runtime) [[ $# -ge 2 ]] || die "--runtime needs a name"; PY_RUNTIME=$2; shift ;;
    --venv) [[ $# -ge 2 ]] || die "--venv needs a folder"; VENV=$2; shift ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a path"; PROJECT=$2; shift ;;
    --require-device) REQUIRE_DEVICE=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
case $PY_RUNTIME in
  auto|tflite-runtime|ai-edge-litert|none) ;;
  *) die "--runtime $PY_RUNTIME: choose auto, tflite-runtime, ai-edge-litert or none" ;;
esac

# Vendor 1a6e:089a is the accelerator before its firmware is loaded, 18d1:9302 after.
find_edgetpu() {
  if ! command -v lsusb >/dev/null 2>&1; then
    echo "unknown"
  elif lsusb -d 18d1:9302 >/dev/null 2>&1; then
    echo "18d1:9302 (firmware loaded)"
  elif lsusb -d 1a6e:089a >/dev/null 2>&1; then
    echo "1a6e:089a (firmware loads on first use)"
  fi
}

confirm_max() {
  cat >&2 <<'EOF'
WARNING: libedgetpu1-max runs the Edge TPU at its maximum clock. Inference is
faster, but the USB Accelerator gets HOT enough to burn on touch; keep it in
free air (a fan helps) and away from skin. Use libedgetpu1-std when unsure.
EOF
  ((YES)) && return 0
  [[ -t 0 ]] || die "--max needs confirmation: re-run with --max --yes, or interactively"
  local answer
  read -r -p "Install libedgetpu1-max anyway? Type yes to continue: " answer
  [[ $answer == yes ]] || die "not confirmed; nothing installed (the default is libedgetpu1-std)"
}

# Which pip package has a wheel for this interpreter and CPU.
auto_runtime() {
  "$PY" - <<'EOF'
import platform, sys
v, m = sys.version_info[:2], platform.machine().lower()
if m.startswith("armv"):  # 32-bit Raspberry Pi OS: only tflite-runtime builds armv7l
    print("tflite-runtime" if v <= (3, 11) else "none")
elif v >= (3, 9):
    print("ai-edge-litert")
else:
    print("tflite-runtime")
EOF
}

externally_managed() {
  "$PY" -c 'import os, sys, sysconfig; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'
}

# -- checks ------------------------------------------------------------------------
[[ -f /etc/debian_version ]] || die "no /etc/debian_version: this script needs Debian, Ubuntu \
or Raspberry Pi OS (apt). For macOS and Windows follow https://coral.ai/docs/accelerator/get-started/"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found; install python3"
if [[ $RUNTIME == libedgetpu1-max ]]; then
  confirm_max
fi
before=$(find_edgetpu)
[[ -n $before ]] && note "Edge TPU on USB: $before"

# -- Coral apt repository and the Edge TPU runtime ------------------------------------
as_root apt-get update
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y curl gnupg ca-certificates usbutils
if ((DRY)); then
  printf '+ %s\n' "curl -fsSL $KEY_URL | gpg --dearmor | sudo tee $KEYRING"
  printf '+ %s\n' "echo 'deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main' | sudo tee $APT_LIST"
else
  curl -fsSL "$KEY_URL" | gpg --dearmor | as_root tee "$KEYRING" >/dev/null
  echo "deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main" \
    | as_root tee "$APT_LIST" >/dev/null
fi
as_root apt-get update
if [[ $RUNTIME == libedgetpu1-max ]]; then
  if ((DRY)); then
    printf '+ %s\n' "echo 'libedgetpu1-max libedgetpu/accepted-eula boolean true' | debconf-set-selections"
  else
    echo "libedgetpu1-max libedgetpu/accepted-eula boolean true" | as_root debconf-set-selections
  fi
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$RUNTIME"

# The package's udev rule gives the plugdev group access to the accelerator.
user=${SUDO_USER:-$(id -un)}
if ! id -nG "$user" | grep -qw plugdev; then
  as_root usermod -aG plugdev "$user"
  note "added $user to the plugdev group: log out and in again for it to apply"
fi

# -- Python packages -------------------------------------------------------------------
[[ $PY_RUNTIME == auto ]] && PY_RUNTIME=$(auto_runtime)
if [[ -z $VENV ]] && externally_managed; then
  VENV=$HOME/gemma-edge-venv
  note "this Python refuses pip --user (PEP 668): using the venv $VENV"
fi
PIP_USER=(--user)
if [[ -n $VENV ]]; then
  if [[ ! -x $VENV/bin/python ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
    run "$PY" -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  PIP_USER=()
fi
if [[ $PY_RUNTIME == none ]]; then
  note "WARNING: no TFLite runtime wheel for this Python/CPU; install one by hand \
(tflite-runtime needs Python <= 3.11 on 32-bit ARM)"
else
  # tflite-runtime (last release 2.14) is built against NumPy 1.x and fails to load a model
  # under NumPy 2 ("compiled using NumPy 1.x cannot be run in NumPy 2"): keep numpy<2 there.
  numpy_spec=numpy
  [[ $PY_RUNTIME == tflite-runtime ]] && numpy_spec="numpy<2"
  run "$PY" -m pip install "${PIP_USER[@]}" "$numpy_spec" "$PY_RUNTIME"
fi
if [[ -n $PROJECT ]]; then
  [[ -e $PROJECT ]] || die "$PROJECT: no such project folder or wheel"
  run "$PY" -m pip install "${PIP_USER[@]}" sentencepiece "$PROJECT"
fi

# -- is the accelerator there? ------------------------------------------------------------
found=$(find_edgetpu)
if [[ $found == unknown ]]; then
  note "lsusb is missing (apt package usbutils): cannot check for the accelerator"
elif [[ -n $found ]]; then
  note "Edge TPU found on USB: $found"
  [[ -n $before ]] && note "it was plugged in during the install: unplug and replug it once so \
the new udev rule applies"
else
  printf '%s\n' "setup-usb-accelerator: no Edge TPU found: lsusb shows neither 1a6e:089a nor" \
    "  18d1:9302. Plug the USB Accelerator into a USB 3 port with its cable (in a VM, pass" \
    "  both IDs through: the ID changes once the firmware loads), then check with" \
    "  lsusb -d 1a6e:089a; lsusb -d 18d1:9302" >&2
  ((REQUIRE_DEVICE)) && exit 1
fi
note "done: $RUNTIME and ${PY_RUNTIME} for $PY"
[[ -n $VENV ]] && note "activate the venv with: source $VENV/bin/activate"
exit 0
