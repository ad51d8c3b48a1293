#!/usr/bin/env bash
# Build the iteravg container image from docker/Dockerfile (which installs with scripts/install.sh), cached.
#
# Usage: scripts/image.sh            builds if needed; the LAST line of stdout is the image reference
#        ENGINE=docker scripts/image.sh
#        BASE=python:3.11-slim-bookworm scripts/image.sh   (any Debian bookworm image with python3.11 + pip)
#
# Caching: the image is tagged localhost/iteravg:<hash>, the hash covering the base, the Dockerfile and every
# file of the build context (tracked or untracked, minus .gitignore'd ones). If that tag exists the script
# returns at once; otherwise the engine's layer cache reuses the dependency layers (Horovod's source build)
# as long as scripts/install.sh and requirements/ did not change, so a source edit costs ~30 s, not minutes.
#
# Base: with podman and no BASE given, a local Debian bookworm root file system is made once with debootstrap
# and `podman import`ed as localhost/iteravg-base:<hash> (no registry is needed, only Debian's apt mirror).
# It holds python3.11 in a virtualenv at /opt/python (first on PATH), so `install.sh system` installs there
# (Debian's own python3 refuses pip installs, PEP 668). The host's local CA certificates
# (/usr/local/share/ca-certificates) are copied in, so pip works behind a TLS-intercepting proxy.
# With docker (or BASE set) the Dockerfile's default python:3.11-slim-bookworm (or BASE) is used instead.
set -euo pipefail
{  # read whole before running: an edit of this file during a long build cannot derail it

here=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=${ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf '[image] %s\n' "$*" >&2; }

# 0. Tools: podman (+ runc, its OCI runtime here) and debootstrap, from apt if missing.
need=()
if ! command -v "$ENGINE" >/dev/null 2>&1; then
  need+=("$ENGINE")
  # netavark (not the CNI plugins apt may pick without recommends) and iptables for its bridge rules.
  [ "$ENGINE" = podman ] && need+=(netavark iptables)
fi
if [ "$ENGINE" = podman ]; then
  command -v runc >/dev/null 2>&1 || need+=(runc)
  [ -n "${BASE:-}" ] || command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$ENGINE" = docker ] && { log "docker is not installed (install Docker, or use ENGINE=podman)"; exit 127; }
  log "apt-get install ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 1. The base image.
make_local_base() {
  local cas recipe tag root
  cas=$(find /usr/local/share/ca-certificates -name '*.crt' 2>/dev/null | sort || true)
  recipe="bookworm minbase python3 python3-venv ca-certificates venv=/opt/python v1 $MIRROR"
  tag=localhost/iteravg-base:$( { echo "$recipe"; [ -z "$cas" ] || cat $cas; } | sha256sum | cut -c1-12)
  if podman image exists "$tag"; then echo "$tag"; return; fi
  log "making the Debian bookworm base with debootstrap (once, ~2-4 min) -> $tag"
  root=$(mktemp -d /var/tmp/iteravg-base.XXXXXX)
  # shellcheck disable=SC2064  # expand $root now
  trap "rm -rf '$root'" RETURN
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >&2
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$MIRROR" "$MIRROR" > "$root/etc/apt/sources.list"
  if [ -n "$cas" ]; then
    # shellcheck disable=SC2086
    cp $cas "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
  fi
  chroot "$root" python3 -m venv /opt/python
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  echo "$tag"
}
if [ -z "${BASE:-}" ] && [ "$ENGINE" = podman ]; then
  BASE=$(make_local_base)
fi
BASE=${BASE:-python:3.11-slim-bookworm}

# 2. The content hash of everything the build reads.
cd "$here"
context_hash() {
  {
    echo "base=$BASE"
    [ "$ENGINE" = podman ] && podman image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || true
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z -c -o --exclude-standard | sort -z | while IFS= read -r -d '' f; do
        [ -f "$f" ] && printf '%s\0' "$f"
      done | xargs -0 -r sha256sum
    else
      find . -path ./.venv -prune -o -path ./.git -prune -o -path ./runs -prune -o -type f -print0 \
        | sort -z | xargs -0 -r sha256sum
    fi
  } | sha256sum | cut -c1-12
}
tag=localhost/iteravg:$(context_hash)

if "$ENGINE" image inspect "$tag" >/dev/null 2>&1; then
  log "up to date: $tag"
else
  log "building $tag from docker/Dockerfile (BASE=$BASE); a cold build compiles Horovod (~10-15 min on 2 cores)"
  build=("$ENGINE" build -f docker/Dockerfile --build-arg "BASE=$BASE" -t "$tag" -t localhost/iteravg:latest)
  # chroot isolation: RUN steps need no OCI runtime (this machine's cgroups defeat crun);
  # the ignore file keeps the host's .venv and compiled kernel out of the context.
  [ "$ENGINE" = podman ] && build+=(--isolation chroot --ignorefile docker/Dockerfile.dockerignore)
  "${build[@]}" . >&2
  # Older content-hash tags of this image only hold stale sources (the dependency layers stay shared).
  "$ENGINE" images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/iteravg:' \
    | grep -v -e ":latest\$" -e "^$tag\$" | xargs -r "$ENGINE" rmi >/dev/null 2>&1 || true
fi
echo "$tag"
exit 0
}
