#!/usr/bin/env bash
# Smoke-test and benchmark gemma-edge on the board it runs on.
#
# 1. embeds a few texts with `gemma-edge embed` (Edge TPU if one is visible and
#    the artifacts have a compiled graph, else CPU), which proves the install;
# 2. runs `gemma-edge bench --json OUT` if this gemma-edge has the bench
#    subcommand, on the Edge TPU first and on the CPU if that fails;
#    without bench it writes the embed timing to OUT instead.
# OUT is always a JSON file, so results from several boards can be compared.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: run-on-board.sh [options] ARTIFACTS_DIR [OUT.json]

Options:
  --backend B      auto (default: edgetpu when a Coral device is visible) |
                   edgetpu | cpu
  --precision P    precision on the Edge TPU: int8 (default) or full-int8
  --cpu-precision P  precision on the CPU: auto (default: int8 when exported,
                   else float), float, int8 or full-int8
  --no-bench       smoke test only: embed, skip the benchmark (OUT gets the
                   embed timing)
  -h, --help       show this help

Environment:
  GEMMA_EDGE       command that runs gemma-edge (default: gemma-edge if on
                   PATH, else "python3 -m gemma_edge.cli")
EOF
}

die() { printf 'run-on-board: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'run-on-board: %s\n' "$*" >&2; }

BACKEND=auto
PRECISION=int8
CPU_PRECISION=auto
BENCH=1
APEX_DEVICE=${GEMMA_EDGE_APEX_DEVICE:-/dev/apex_0}
POSITIONAL=()
while (($#)); do
  case $1 in
    --backend) [[ $# -ge 2 ]] || die "--backend needs a value"; BACKEND=$2; shift ;;
    --precision) [[ $# -ge 2 ]] || die "--precision needs a value"; PRECISION=$2; shift ;;
    --cpu-precision) [[ $# -ge 2 ]] || die "--cpu-precision needs a value"; CPU_PRECISION=$2; shift ;;
    --no-bench) BENCH=0 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
((${#POSITIONAL[@]} >= 1 && ${#POSITIONAL[@]} <= 2)) || { usage >&2; exit 2; }
ART=${POSITIONAL[0]}
OUT=${POSITIONAL[1]:-bench-$(uname -n)-$(date +%Y%m%d-%H%M%S).json}
case $BACKEND in auto|edgetpu|cpu) ;; *) die "--backend $BACKEND: choose auto, edgetpu or cpu" ;; esac
case $PRECISION in int8|full-int8) ;; *) die "--precision $PRECISION: choose int8 or full-int8" ;; esac
case $CPU_PRECISION in auto|float|int8|full-int8) ;;
  *) die "--cpu-precision $CPU_PRECISION: choose auto, float, int8 or full-int8" ;; esac
[[ -f $ART/manifest.json ]] || die "$ART/manifest.json missing: copy the artifacts with \
scripts/deploy-to-board.sh first"

if [[ -n ${GEMMA_EDGE:-} ]]; then
  read -r -a GE <<<"$GEMMA_EDGE"
elif command -v gemma-edge >/dev/null 2>&1; then
  GE=(gemma-edge)
else
  GE=(python3 -m gemma_edge.cli)
fi
"${GE[@]}" --help >/dev/null 2>&1 || die "cannot run ${GE[*]}; install gemma-edge first \
(scripts/setup-devboard.sh or scripts/setup-usb-accelerator.sh)"

edgetpu_visible() {
  [[ -e $APEX_DEVICE ]] && return 0
  command -v lsusb >/dev/null 2>&1 || return 1
  lsusb -d 18d1:9302 >/dev/null 2>&1 || lsusb -d 1a6e:089a >/dev/null 2>&1
}
if [[ $BACKEND == auto ]]; then
  if edgetpu_visible; then BACKEND=edgetpu; else BACKEND=cpu; note "no Edge TPU visible: CPU only"; fi
fi
runtime_args() {  # backend -> the runtime flags of gemma-edge
  if [[ $1 == edgetpu ]]; then echo "--backend edgetpu --precision $PRECISION"
  else echo "--backend cpu --precision $CPU_PRECISION"; fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/texts.txt" <<'EOF'
How do I flash Mendel Linux onto the Coral Dev Board?
The Edge TPU runs 8-bit integer graphs at a few watts.
Matryoshka embeddings can be truncated to 256 or 128 dimensions.
Wie schnell ist die Einbettung auf dem Board?
EOF

now() { python3 -c 'import time; print(f"{time.time():.3f}")'; }

embed_with() {  # backend -> prints the seconds the embed took; fails like gemma-edge
  local start end args
  read -r -a args <<<"$(runtime_args "$1")"
  start=$(now)
  # explicit `|| return`: set -e is off inside a function called from an `if` condition
  "${GE[@]}" embed --artifacts "$ART" --input "$work/texts.txt" --output "$work/emb.npy" \
    "${args[@]}" >&2 || return 1
  end=$(now)
  python3 -c "print(f'{$end - $start:.3f}')"
}

used=$BACKEND
if ! seconds=$(embed_with "$used"); then
  [[ $used == cpu ]] && die "gemma-edge embed failed on the CPU; see the error above"
  note "embedding on the Edge TPU failed (see above): retrying on the CPU"
  used=cpu
  seconds=$(embed_with cpu) || die "gemma-edge embed failed on the CPU too; see the error above"
fi
note "embed: 4 texts in $seconds s on $used"

if ((BENCH)) && "${GE[@]}" bench --help >/dev/null 2>&1; then
  bench_with() {  # the Edge TPU runs 8-bit graphs only: ask for that precision there
    local help args=(--backend "$1")
    help=$("${GE[@]}" bench --help 2>/dev/null || true)
    if [[ $1 == edgetpu && $help == *--precisions* ]]; then
      args+=(--precisions "$PRECISION")
    elif [[ $1 == edgetpu && $help == *--precision* ]]; then
      args+=(--precision "$PRECISION")
    fi
    "${GE[@]}" bench --artifacts "$ART" "${args[@]}" --json "$OUT"
  }
  if ! bench_with "$used"; then
    [[ $used == cpu ]] && die "gemma-edge bench failed; see the error above"
    note "bench on the Edge TPU failed (see above): falling back to the CPU"
    bench_with cpu || die "gemma-edge bench failed on the CPU too; see the error above"
  fi
else
  if ((BENCH)); then note "this gemma-edge has no bench subcommand: writing the embed timing only"
  else note "--no-bench: writing the embed timing only"; fi
  printf '{"host": "%s", "backend": "%s", "texts": 4, "embed_seconds": %s, "bench": null}\n' \
    "$(uname -n)" "$used" "$seconds" >"$OUT"
fi
[[ -s $OUT ]] || die "$OUT was not written"
note "wrote $OUT"
