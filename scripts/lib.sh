# Shared helpers for the scripts: install what is missing, find or start a Redis.
# Sourced, not run.

say() { printf '==> %s\n' "$*" >&2; }

# ensure_command CMD PACKAGE: installs PACKAGE with apt-get when CMD is missing and we are
# root; otherwise says exactly what to install.
ensure_command() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $pkg (for $cmd)"
    if [ -z "${FREE_ROAM_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      export FREE_ROAM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
  else
    say "missing: $cmd. Install the '$pkg' package (for example: sudo apt-get install -y $pkg)."
    return 1
  fi
}

# The RTSP camera the tests serve (tests/rtsp/serve.py): GStreamer's RTSP server with an
# H.264 encoder, driven from the system Python.
RTSP_TEST_PACKAGES="python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly"
rtsp_server_ready() {
  /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); gi.require_version("Gst", "1.0"); from gi.repository import Gst, GstRtspServer; Gst.init(None); assert Gst.ElementFactory.find("x264enc") and Gst.ElementFactory.find("rtph264pay")' >/dev/null 2>&1
}
ensure_rtsp_server() {
  rtsp_server_ready && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing the RTSP test server ($RTSP_TEST_PACKAGES)"
    if [ -z "${FREE_ROAM_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      export FREE_ROAM_APT_UPDATED=1
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $RTSP_TEST_PACKAGES >&2
  else
    say "missing: the RTSP test server. Install: sudo apt-get install -y $RTSP_TEST_PACKAGES"
    return 1
  fi
}

ensure_tools() {
  ensure_command redis-server redis-server
  ensure_command redis-cli redis-tools
  ensure_command ffmpeg ffmpeg
  ensure_rtsp_server
  ensure_command cargo cargo || { say "Rust (cargo) is needed: see https://rustup.rs"; return 1; }
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# use_redis: exports REDIS_URL: the one given, a reachable one on 127.0.0.1:6379, or a
# private redis-server on a free port (stopped by stop_private_redis).
use_redis() {
  if [ -n "${REDIS_URL:-}" ]; then return 0; fi
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    export REDIS_URL=redis://127.0.0.1:6379/0
    say "using the Redis on 127.0.0.1:6379"
    return 0
  fi
  local port dir
  port=$(free_port)
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export REDIS_URL="redis://127.0.0.1:$port/0"
  export FREE_ROAM_PRIVATE_REDIS_DIR=$dir
  say "no Redis was reachable: started a private one on port $port"
}

stop_private_redis() {
  if [ -n "${FREE_ROAM_PRIVATE_REDIS_DIR:-}" ] && [ -f "$FREE_ROAM_PRIVATE_REDIS_DIR/redis.pid" ]; then
    kill "$(cat "$FREE_ROAM_PRIVATE_REDIS_DIR/redis.pid")" 2>/dev/null || true
    rm -rf "$FREE_ROAM_PRIVATE_REDIS_DIR"
  fi
}
