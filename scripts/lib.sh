# Shared helpers for the scripts: install what is missing, find or start a Redis.
# Sourced, not run.

say() { printf '==> %s\n' "$*" >&2; }

# apt_install PACKAGE WHY: installs PACKAGE with apt-get when we are root; otherwise says
# exactly what to install.
apt_install() {
  local pkg=$1 why=$2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $pkg ($why)"
    if [ -z "${FREE_ROAM_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      export FREE_ROAM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
  else
    say "missing: $why. Install the '$pkg' package (for example: sudo apt-get install -y $pkg)."
    return 1
  fi
}

# ensure_command CMD PACKAGE: installs PACKAGE when CMD is missing.
ensure_command() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2" "the $1 command"
}

ensure_tools() {
  ensure_command redis-server redis-server
  ensure_command redis-cli redis-tools
  ensure_command ffmpeg ffmpeg
  ensure_command cargo cargo || { say "Rust (cargo) is needed: see https://rustup.rs"; return 1; }
}

# ensure_python_venv: python3 with its venv module (Debian splits it out), for the scripts
# that install Python tools by package name into a venv.
ensure_python_venv() {
  ensure_command python3 python3
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv "python3's venv module"
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
