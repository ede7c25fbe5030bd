#!/usr/bin/env bash
# Copy a gemma-edge artifacts directory from the workstation to a board, then
# verify that every file arrived whole (same byte size on both sides).
#
# Why the check: artifacts are hundreds of MB and a copy cut short by a full SD
# card or a dropped link leaves truncated graphs that fail later, on the board,
# with a confusing error. Uses `mdt push` for a Coral Dev Board reached over
# MDT (no host given), else rsync when both sides have it, else scp.
set -euo pipefail
# Runs on the workstation, macOS's bash 3.2 included (no mapfile, guarded empty arrays).

usage() {
  cat <<'EOF'
Usage: deploy-to-board.sh [options] ARTIFACTS_DIR [USER@HOST]

Without USER@HOST the board is reached with Coral's `mdt` (Dev Board over USB
or mDNS; choose a board with `mdt set preferred-device NAME`).

Options:
  --dest DIR         folder on the board (default: gemma-edge/NAME in the
                     login's home; /home/mendel/gemma-edge/NAME with mdt)
  --method M         auto (default) | mdt | rsync | scp | local (copy on this
                     machine, e.g. a board's own checkout; no USER@HOST)
  --ssh-option OPT   extra ssh/scp/rsync -o option, e.g. Port=2222 (repeatable)
  -h, --help         show this help
EOF
}

die() { printf 'deploy-to-board: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'deploy-to-board: %s\n' "$*"; }

METHOD=auto
DEST=""
SSH_OPTS=()
POSITIONAL=()
while (($#)); do
  case $1 in
    --dest) [[ $# -ge 2 ]] || die "--dest needs a folder"; DEST=$2; shift ;;
    --method) [[ $# -ge 2 ]] || die "--method needs a name"; METHOD=$2; shift ;;
    --ssh-option) [[ $# -ge 2 ]] || die "--ssh-option needs a value"; SSH_OPTS+=(-o "$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
((${#POSITIONAL[@]} >= 1 && ${#POSITIONAL[@]} <= 2)) || { usage >&2; exit 2; }
ART=${POSITIONAL[0]}
HOST=${POSITIONAL[1]:-}
[[ -d $ART ]] || die "$ART: no such directory; pass the folder \`gemma-edge export\` wrote"
[[ -f $ART/manifest.json ]] || die "$ART/manifest.json missing: not a gemma-edge artifacts directory"
ART=$(cd "$ART" && pwd)
NAME=$(basename "$ART")

case $METHOD in
  auto)
    if [[ -z $HOST ]]; then
      command -v mdt >/dev/null 2>&1 || die "no USER@HOST given and \`mdt\` is not installed \
(pip install mendel-development-tool), so there is no way to reach the board"
      METHOD=mdt
    elif command -v rsync >/dev/null 2>&1 \
        && ssh ${SSH_OPTS[@]+"${SSH_OPTS[@]}"} "$HOST" "command -v rsync" >/dev/null 2>&1; then
      METHOD=rsync
    else
      METHOD=scp
    fi ;;
  mdt) command -v mdt >/dev/null 2>&1 || die "mdt not found: pip install mendel-development-tool" ;;
  rsync|scp) [[ -n $HOST ]] || die "--method $METHOD needs USER@HOST" ;;
  local) [[ -z $HOST ]] || die "--method local copies on this machine: drop $HOST" ;;
  *) die "--method $METHOD: choose auto, mdt, rsync, scp or local" ;;
esac
DEST=${DEST#\~/}  # ~/x means x in the login's home; a quoted ~ would not expand
if [[ -z $DEST ]]; then
  if [[ $METHOD == mdt ]]; then DEST=/home/mendel/gemma-edge/$NAME; else DEST=gemma-edge/$NAME; fi
fi
qdest=$(printf '%q' "$DEST")

# "SIZE ./relative/path" per file, sorted; the same script runs on both sides.
# shellcheck disable=SC2016  # expanded by the shell that runs it, not here
LIST_SIZES='find . -type f ! -name ".*" | LC_ALL=C sort | while IFS= read -r f; do printf "%s %s\n" "$(wc -c < "$f" | tr -d " ")" "$f"; done'

remote() {  # run a shell command on the board
  if [[ $METHOD == mdt ]]; then
    mdt exec "$1" | tr -d '\r'
  elif [[ $METHOD == local ]]; then  # relative to the home folder, as over ssh
    (cd ~ && bash -c "$1")
  else
    # shellcheck disable=SC2029  # the command is built (and quoted) here on purpose
    ssh ${SSH_OPTS[@]+"${SSH_OPTS[@]}"} "$HOST" "$1"
  fi
}

total=$(du -sk "$ART" | cut -f1)
note "copying $ART ($((total / 1024)) MB) to ${HOST:-the $METHOD board}:$DEST by $METHOD"
remote "mkdir -p $qdest" >/dev/null || die "cannot reach the board (see above); check that \
$([[ $METHOD == mdt ]] && echo "\`mdt shell\`" || echo "\`ssh $HOST\`") works"
case $METHOD in
  mdt)
    # mdt push copies files (older mdt versions cannot push folders): one folder at a time
    while IFS= read -r dir; do
      rel=${dir#"$ART"}
      remote "mkdir -p $(printf '%q' "$DEST$rel")" >/dev/null
      files=()
      while IFS= read -r -d '' f; do files+=("$f"); done \
        < <(find "$dir" -maxdepth 1 -type f ! -name '.*' -print0)
      if ((${#files[@]})); then mdt push "${files[@]}" "$DEST$rel" || die "mdt push failed (see above)"; fi
    done < <(find "$ART" -type d ! -name '.*')
    ;;
  rsync)
    rsync -a --partial --progress --exclude '.*' -e "ssh ${SSH_OPTS[*]+"${SSH_OPTS[*]}"}" \
      "$ART/" "$HOST:$DEST/" || die "rsync failed (see above); re-run to resume the copy" ;;
  scp)
    shopt -s nullglob
    entries=("$ART"/*)
    scp -rp ${SSH_OPTS[@]+"${SSH_OPTS[@]}"} "${entries[@]}" "$HOST:$DEST/" \
      || die "scp failed (see above); check free space on the board and re-run" ;;
  local)
    (cd ~ && cp -R "$ART/." "$DEST/") || die "copy to $DEST failed (see above); check free space" ;;
esac

local_sizes=$(cd "$ART" && bash -c "$LIST_SIZES")
remote_sizes=$(remote "cd $qdest && $LIST_SIZES") || die "cannot list $DEST on the board"
if [[ $local_sizes != "$remote_sizes" ]]; then
  printf 'deploy-to-board: error: sizes differ after the copy (< here, > on the board):\n' >&2
  diff <(printf '%s\n' "$local_sizes") <(printf '%s\n' "$remote_sizes") >&2 || true
  die "re-run the deploy; if it repeats, check free space on the board (df -h $DEST)"
fi
count=$(printf '%s\n' "$local_sizes" | grep -c .)
note "verified: $count files, sizes match on the board"
note "on the board: scripts/run-on-board.sh $DEST"
note "to serve it at boot (OpenAI-compatible /v1/embeddings): scripts/install-serve-service.sh $DEST on the board"
