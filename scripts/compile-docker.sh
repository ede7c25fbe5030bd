#!/usr/bin/env bash
# Run `gemma-edge compile` inside an x86-64 Debian container with Coral's edgetpu_compiler.
#
# Works on any Docker host: on a Mac (Apple silicon) or an ARM Linux machine the
# linux/amd64 image runs under emulation (slower, but the compiler is x86-64 only).
#
# Usage: scripts/compile-docker.sh ARTIFACTS_DIR|MODEL.tflite [gemma-edge compile options]
#        GEMMA_EDGE_COMPILER_IMAGE=name:tag  image to build/use
#        GEMMA_EDGE_REBUILD=1                rebuild the image even if it exists
set -euo pipefail

die() {
    echo "compile-docker: $*" >&2
    exit 1
}

[[ $# -ge 1 ]] || die "usage: scripts/compile-docker.sh ARTIFACTS_DIR|MODEL.tflite [options]"
command -v docker >/dev/null 2>&1 || die "docker not found; install Docker, or on x86-64 Debian/Ubuntu use scripts/install-edgetpu-compiler.sh"
docker info >/dev/null 2>&1 || die "the Docker engine is not running (docker info failed); start it and retry"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${GEMMA_EDGE_COMPILER_IMAGE:-gemma-edge-compiler:latest}"
target="$1"
shift

if [[ -d "$target" ]]; then
    mount_dir="$(cd "$target" && pwd)"
    inside="/work"
elif [[ -f "$target" ]]; then
    mount_dir="$(cd "$(dirname "$target")" && pwd)"
    inside="/work/$(basename "$target")"
else
    die "$target: no such file or directory"
fi

if [[ "${GEMMA_EDGE_REBUILD:-0}" == "1" ]] || ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "Building $image (linux/amd64) from docker/Dockerfile..."
    docker build --platform linux/amd64 -f "$repo/docker/Dockerfile" -t "$image" "$repo"
fi

# Paths in the options are the host's: --out (the only path option) is made absolute
# here, relative to the caller's folder, and mounted; inside, the container's /work is
# the working directory, where a host path would not resolve.
mounts=(-v "$mount_dir:/work")
opts=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out|--out=*)
            if [[ "$1" == --out ]]; then
                [[ $# -ge 2 ]] || die "--out needs a folder"
                out="$2"
                shift 2
            else
                out="${1#--out=}"
                shift
            fi
            mkdir -p -- "$out" || die "--out $out: cannot create that folder"
            out_abs="$(cd "$out" && pwd)"
            if [[ "$out_abs" == "$mount_dir" ]]; then
                opts+=(--out /work)
            else
                mounts+=(-v "$out_abs:/out")
                opts+=(--out /out)
            fi
            ;;
        *)
            opts+=("$1")
            shift
            ;;
    esac
done

# Run as the calling user so the compiled files in the mounted folder are theirs.
docker run --rm --platform linux/amd64 \
    --user "$(id -u):$(id -g)" \
    "${mounts[@]}" \
    "$image" compile "$inside" ${opts[@]+"${opts[@]}"}
