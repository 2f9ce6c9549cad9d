#!/usr/bin/env bash
# `make images` / `make images GPU=1`: build the project's images from docker/*.Dockerfile with rootful podman,
# on a machine that reaches PyPI and the Debian mirror but no container registry
# (recipe and why each step: ../shared/design/containers.md).
#
#   docker/build.sh                  the three images of the manifests (training, serving, streaming)
#   docker/build.sh serving ...      only those
#   GPU=1 docker/build.sh            also ghcr.io/rentalml/rentalml-gpu (several GB of CUDA wheels)
#   docker/build.sh conf             write the project's CONTAINERS_CONF and print its path (the image tests use it)
#   docker/build.sh base             only the local Debian bookworm python base
#
# Environment: PYTHON_IMAGE (default: a local base made once with debootstrap, localhost/debian-python:bookworm;
# set it to e.g. docker.io/library/python:3.11.11-slim-bookworm where a registry is reachable),
# TORCH_WHEELS (a directory holding the torch 2.13.0+cpu wheel, default /opt/wheels when it does and
# download.pytorch.org is unreachable), RENTALML_PODMAN_DIR (default .rentalml/podman), VERSION (default: pyproject's).
# Each build's seconds and every image's size are appended to $RENTALML_PODMAN_DIR/builds.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${RENTALML_PODMAN_DIR:-$ROOT/.rentalml/podman}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
BASE=localhost/debian-python:bookworm
PYTHON_IMAGE=${PYTHON_IMAGE:-$BASE}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
log() { printf '[images] %s\n' "$*" >&2; }

install_tools() {
  local need=()
  command -v podman >/dev/null || need+=(podman)
  command -v buildah >/dev/null || need+=(buildah)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v runc >/dev/null || need+=(runc)  # crun refuses these VMs' hybrid cgroups
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends podman buildah debootstrap runc \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends podman buildah debootstrap runc; }
}

write_conf() {
  mkdir -p "$STATE"
  local nofile; nofile=$(ulimit -Hn)
  [ "$nofile" = unlimited ] && nofile=1048576
  sed "s/@NOFILE@/$nofile/g" "$ROOT/docker/containers.conf.in" > "$STATE/containers.conf.tmp"
  mv "$STATE/containers.conf.tmp" "$STATE/containers.conf"
  export CONTAINERS_CONF=$STATE/containers.conf
}

apt_mirror() {  # the Debian mirror apt already uses (deb822 or one-line sources)
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$m" ] || m=$(grep -hsE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                     | awk '{print $2}' | grep -v security | head -1 || true)
  grep -qs '^ID=debian' /etc/os-release || m=""  # another distribution's mirror has no bookworm
  echo "${m:-http://deb.debian.org/debian}"
}

make_base() {
  [ "$PYTHON_IMAGE" = "$BASE" ] || return 0
  if podman image exists "$BASE"; then return 0; fi
  local t0=$SECONDS rootfs mirror
  mirror=$(apt_mirror)
  rootfs=$(mktemp -d /var/tmp/rentalml-rootfs.XXXXXX)
  # a RETURN trap stays set after the function returns and would fire again at main's return, where the local
  # rootfs no longer exists (set -u: "unbound variable", the first build on a fresh machine failed so): clear it
  trap '$SUDO rm -rf "$rootfs"; trap - RETURN' RETURN
  log "debootstrap bookworm from $mirror"
  $SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$STATE/debootstrap.log" >&2; return 1; }
  $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  $SUDO find "$rootfs/usr/lib" -maxdepth 2 -name EXTERNALLY-MANAGED -delete
  $SUDO tar -C "$rootfs" -c . | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
  record base "$BASE" $((SECONDS - t0))
}

record() {  # name image seconds
  local size
  size=$(podman image inspect --format '{{.Size}}' "$2")
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$1" "$2" "$3" "$size" >> "$STATE/builds.tsv"
  log "$2: $3 s, $((size / 1000000)) MB"
}

build() {  # name dockerfile image
  local pull=never  # the local base is never pulled; a registry base (PYTHON_IMAGE=...) is, once
  [ "$PYTHON_IMAGE" = "$BASE" ] || pull=missing
  local args=(--pull="$pull" --layers --format docker -f "$2" -t "$3"
              --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
              -v "$CA_BUNDLE:$CA_BUNDLE:ro")  # the host's CA bundle: pip in the build needs its extra CA
  # torch: the CPU (or CUDA) index is the Dockerfiles' default. Where download.pytorch.org is unreachable, the
  # CPU images take the same 2.13.0+cpu wheel from a local directory (its dependencies from PyPI), and the GPU
  # image PyPI's torch 2.13.0, which is the CUDA 13.0 build of the cu130 index
  if [ "$PYTORCH_INDEX" = 0 ]; then
    if [ "$1" = gpu ]; then
      args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
    elif [ -n "$TORCH_WHEELS" ]; then
      args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg "TORCH_FIND_LINKS=$TORCH_WHEELS"
             -v "$TORCH_WHEELS:$TORCH_WHEELS:ro")
    else
      log "download.pytorch.org is unreachable and no torch 2.13.0+cpu wheel was found (set TORCH_WHEELS=DIR)"
      return 1
    fi
  fi
  local t0=$SECONDS
  log "building $3 from $2"
  podman build "${args[@]}" . >"$STATE/build-$1.log" 2>&1 || { tail -40 "$STATE/build-$1.log" >&2; return 1; }
  record "$1" "$3" $((SECONDS - t0))
}

main() {  # (a function, so bash has read the whole file before it runs: editing it mid-build is harmless)
install_tools
write_conf
case "${1:-}" in
  conf) echo "$CONTAINERS_CONF"; return 0 ;;
  base) make_base; return 0 ;;
esac

PYTORCH_INDEX=1
curl -fsS -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/ 2>/dev/null || PYTORCH_INDEX=0
if [ -z "${TORCH_WHEELS+x}" ]; then
  TORCH_WHEELS=""
  compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null && TORCH_WHEELS=/opt/wheels
fi

declare -A FILE=([training]=docker/training.Dockerfile [serving]=docker/serving.Dockerfile
                 [streaming]=docker/streaming.Dockerfile [gpu]=docker/training-gpu.Dockerfile)
declare -A IMAGE=([training]=ghcr.io/rentalml/rentalml:$VERSION [serving]=ghcr.io/rentalml/rentalml-serving:$VERSION
                  [streaming]=ghcr.io/rentalml/rentalml-streaming:$VERSION
                  [gpu]=ghcr.io/rentalml/rentalml-gpu:$VERSION)
names=("$@")
if ((${#names[@]} == 0)); then
  names=(training serving streaming)
  [ "${GPU:-0}" = 1 ] && names+=(gpu)
fi
make_base
for n in "${names[@]}"; do
  [ -n "${FILE[$n]:-}" ] || { log "unknown image $n (training serving streaming gpu)"; return 2; }
  build "$n" "${FILE[$n]}" "${IMAGE[$n]}"
done
}

main "$@"
