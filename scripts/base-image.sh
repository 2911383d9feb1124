#!/usr/bin/env bash
# Ensure the local base image orion/debian:bookworm exists.
#
# Our Dockerfiles build FROM this tag so that nothing needs a container
# registry. Order of preference:
#   1. already present           -> nothing to do (fast path)
#   2. `docker pull` works        -> retag debian:bookworm-slim
#   3. no registry reachable      -> debootstrap a minbase bookworm rootfs from
#                                    the host's own Debian mirror and import it
#
# Env:
#   ORION_BASE_IMAGE        tag to produce (default orion/debian:bookworm)
#   ORION_BASE_PULL=0       skip the `docker pull` attempt (offline machines)
#   ORION_BASE_PULL_TIMEOUT seconds allowed for the pull attempt (default 120)
#   ORION_DEBIAN_MIRROR / ORION_DEBIAN_SECURITY_MIRROR
#                           override the mirrors read from the host apt sources
#   ORION_BASE_REBUILD=1    rebuild even if the tag exists
set -euo pipefail

IMAGE="${ORION_BASE_IMAGE:-orion/debian:bookworm}"
SUITE=bookworm
PUBLIC_IMAGE=debian:bookworm-slim

log() { echo "base-image: $*" >&2; }
die() { echo "base-image: ERROR: $*" >&2; exit 1; }

have_image() { docker image inspect "$IMAGE" >/dev/null 2>&1; }

# Fast path before taking any lock.
if [[ "${ORION_BASE_REBUILD:-0}" != 1 ]] && have_image; then
  log "$IMAGE already present"
  exit 0
fi

# Serialise concurrent runs (e.g. two test suites starting at once): the
# second one waits and then finds the image already there.
LOCK="${TMPDIR:-/tmp}/orion-base-image.lock"
exec 9>"$LOCK"
flock 9
if [[ "${ORION_BASE_REBUILD:-0}" != 1 ]] && have_image; then
  log "$IMAGE already present"
  exit 0
fi

# --- 2. a registry is reachable: just use the official slim image ----------
if [[ "${ORION_BASE_PULL:-1}" != 0 ]]; then
  log "trying docker pull $PUBLIC_IMAGE"
  if timeout "${ORION_BASE_PULL_TIMEOUT:-120}" docker pull -q "$PUBLIC_IMAGE" >/dev/null 2>&1; then
    docker tag "$PUBLIC_IMAGE" "$IMAGE"
    log "tagged $PUBLIC_IMAGE as $IMAGE"
    exit 0
  fi
  log "pull failed (no registry?); building from the Debian mirror with debootstrap"
fi

# --- 3. debootstrap from the host's mirror ---------------------------------
[[ $(id -u) == 0 ]] || die "debootstrap needs root"

# Print "<main-uri> <security-uri>" read from the host's apt sources, so the
# mirror host is never hard-coded. Handles deb822 *.sources and one-line
# sources.list. Security URI may be "-" if the host has none.
host_mirrors() {
  local files=()
  shopt -s nullglob
  files+=(/etc/apt/sources.list.d/*.sources)
  shopt -u nullglob
  {
    # deb822: emit "uri suite" pairs for enabled "deb" paragraphs.
    if ((${#files[@]})); then
      awk '
        function flush() {
          if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
            n = split(uris, U, /[ \t]+/); m = split(suites, S, /[ \t]+/)
            for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
              if (U[i] != "" && S[j] != "") print U[i], S[j]
          }
          types = uris = suites = ""; enabled = "yes"
        }
        BEGIN { enabled = "yes" }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^Types:/   { sub(/^Types:[ \t]*/, "");   types = $0;   next }
        /^URIs:/    { sub(/^URIs:[ \t]*/, "");    uris = $0;    next }
        /^Suites:/  { sub(/^Suites:[ \t]*/, "");  suites = $0;  next }
        /^Enabled:/ { sub(/^Enabled:[ \t]*/, ""); enabled = $0; next }
        END { flush() }
      ' "${files[@]}"
    fi
    # one-line format: deb [options] uri suite components...
    if [[ -r /etc/apt/sources.list ]]; then
      sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+([^[:space:]]+).*/\2 \3/p' \
        /etc/apt/sources.list
    fi
  } | awk '
    # Keep only Debian suites over http(s); prefer URIs that look like the
    # main archive (.../debian) over third-party repos using Debian codenames.
    BEGIN { rel = "^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldstable|stable|testing|unstable)" }
    $1 !~ /^https?:\/\// { next }
    $2 ~ rel "(-security|/updates)$" { if (sec == "") sec = $1; next }
    $2 ~ rel "(-updates|-backports|-proposed-updates)?$" {
      if ($1 ~ /\/debian\/?$/) { if (pmain == "") pmain = $1 } else if (main == "") main = $1
    }
    END {
      if (pmain != "") main = pmain
      if (main == "") exit 1
      print main, (sec == "" ? "-" : sec)
    }'
}

if [[ -n "${ORION_DEBIAN_MIRROR:-}" ]]; then
  MIRROR="$ORION_DEBIAN_MIRROR"
  SECURITY="${ORION_DEBIAN_SECURITY_MIRROR:--}"
else
  read -r MIRROR SECURITY < <(host_mirrors) || die "could not find a Debian mirror in /etc/apt/sources.list{,.d/*.sources}; set ORION_DEBIAN_MIRROR"
  SECURITY="${ORION_DEBIAN_SECURITY_MIRROR:-$SECURITY}"
fi
MIRROR="${MIRROR%/}"; SECURITY="${SECURITY%/}"
log "mirror: $MIRROR  security: $SECURITY"

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# /var/tmp rather than /tmp: /tmp may be a nodev/noexec tmpfs.
ROOT="$(mktemp -d /var/tmp/orion-rootfs.XXXXXX)"
# mktemp makes the dir 0700 and it becomes the image's "/": open it up or
# non-root users (sshd privsep, mysql, tenants) can't traverse /.
chmod 755 "$ROOT"
cleanup() {
  # Never rm -rf through a mount (debootstrap or our chroot may have left
  # /proc etc. mounted if it failed half way): unmount deepest first.
  local m
  awk -v r="$ROOT" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$ROOT"
  rm -f "$ROOT.log"
}
trap cleanup EXIT

t0=$SECONDS
log "debootstrap --variant=minbase $SUITE into $ROOT"
if ! debootstrap --variant=minbase --components=main "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1; then
  tail -n 30 "$ROOT.log" >&2 || true
  rm -f "$ROOT.log"
  die "debootstrap failed"
fi
rm -f "$ROOT.log"
log "debootstrap done in $((SECONDS - t0))s"

# Apt sources inside the image: the same mirror (+ security if the host has one).
rm -f "$ROOT/etc/apt/sources.list"
mkdir -p "$ROOT/etc/apt/sources.list.d"
{
  printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$MIRROR" "$SUITE" "$SUITE"
  if [[ "$SECURITY" != - ]]; then
    printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$SECURITY" "$SUITE"
  fi
} >"$ROOT/etc/apt/sources.list.d/debian.sources"

# Container conventions, as in Debian's official images:
# - never start daemons from package maintainer scripts during builds
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
# - keep apt caches and translations out of image layers
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' >"$ROOT/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$ROOT/etc/apt/apt.conf.d/docker-autoremove-suggests"
# - "slim": no docs/man/locales, now and for packages installed later
#   (we run hundreds of workers; every MB counts)
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
DPKG
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "${ROOT:?}"/usr/share/{man,info,groff,lintian,linda,locale}/*

# Bring the rootfs up to date with bookworm-updates/-security (debootstrap
# only installs the point release). Needs DNS and /proc in the chroot.
log "applying updates in the chroot"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
if ! chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Use-Pty=0 dist-upgrade && apt-get -y -qq autoremove' \
  >"$ROOT.log" 2>&1; then
  tail -n 30 "$ROOT.log" >&2 || true
  die "apt-get dist-upgrade in the chroot failed"
fi
umount "$ROOT/proc"

# Strip host/build leftovers; Docker provides /dev, hostname, resolv.conf.
# (files only under apt's dirs: keep the _apt-owned partial/ dirs intact)
find "$ROOT/var/lib/apt/lists" "$ROOT/var/cache/apt" -type f -delete
rm -rf "${ROOT:?}"/var/cache/debconf/*-old "${ROOT:?}"/var/lib/dpkg/*-old "${ROOT:?}"/var/log/* \
  "${ROOT:?}"/tmp/* "${ROOT:?}"/var/tmp/* "${ROOT:?}"/dev/* "${ROOT:?}"/run/*
: >"$ROOT/etc/resolv.conf"
: >"$ROOT/etc/hostname"
[[ -e "$ROOT/etc/machine-id" ]] && : >"$ROOT/etc/machine-id"

old_id="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
log "importing into docker as $IMAGE ($(du -sh "$ROOT" | cut -f1))"
tar --numeric-owner -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  --message "debootstrap minbase $SUITE from $MIRROR" \
  - "$IMAGE" >/dev/null
# On a forced rebuild drop the previous, now untagged, image (fails harmlessly
# while images built on top of it still exist).
if [[ -n "$old_id" && "$old_id" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true
fi
log "done: $IMAGE in $((SECONDS - t0))s"
