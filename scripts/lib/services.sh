# Functions that check the services the tests need and start them when they are down.
# Sourced by scripts/test and scripts/services.

log() { printf '==> %s\n' "$*" >&2; }

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && exec 3>&- 3<&-
}

wait_port() { # host port seconds name
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.25
  done
  log "$4 did not open $1:$2 within $3 s"
  return 1
}

ensure_rabbitmq() {
  if port_open 127.0.0.1 5672; then
    log "RabbitMQ is up on 127.0.0.1:5672"
    return 0
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed."
    log "Install it (Debian: apt-get install rabbitmq-server) or run: docker compose up -d rabbitmq"
    return 1
  fi
  log "starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 127.0.0.1 5672 90 RabbitMQ
}

ensure_postgres() {
  if port_open 127.0.0.1 5432; then
    log "PostgreSQL is up on 127.0.0.1:5432"
  else
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
      log "PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not installed."
      log "Install it (Debian: apt-get install postgresql) or run: docker compose up -d postgres"
      return 1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version (pg_ctlcluster $version main start)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port 127.0.0.1 5432 60 PostgreSQL || return 1
  fi
  if command -v psql >/dev/null 2>&1; then
    if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1; then
      log "creating database test"
      psql -h 127.0.0.1 -U postgres -d postgres -c "create database test" >/dev/null 2>&1 || true
    fi
  fi
}

# The Kafka-protocol broker the tests use: nisshi (tansu's new name) with memory storage.
# 0.8.1 fixes fetches that start inside a record batch; its dependencies need rustc 1.96,
# so it is built with that toolchain (installed by rustup when missing).
NISSHI_VERSION=0.8.1
NISSHI_RUST=1.96.0

ensure_kafka_broker() {
  if port_open 127.0.0.1 9092; then
    log "a Kafka-protocol broker is up on 127.0.0.1:9092"
    return 0
  fi
  if ! command -v nisshi >/dev/null 2>&1; then
    if ! rustup run "$NISSHI_RUST" rustc --version >/dev/null 2>&1; then
      log "installing the Rust $NISSHI_RUST toolchain nisshi needs (rustup, minimal profile)"
      rustup toolchain install "$NISSHI_RUST" --profile minimal
    fi
    log "installing nisshi $NISSHI_VERSION (cargo install, memory storage only; about 20 minutes on 2 cores)"
    cargo "+$NISSHI_RUST" install nisshi --locked --version "$NISSHI_VERSION" \
      --no-default-features --features dynostore
  fi
  local dir="${TMPDIR:-/tmp}/busway-nisshi"
  mkdir -p "$dir"
  log "starting nisshi on 127.0.0.1:9092 (memory storage; log in $dir/broker.log)"
  nohup nisshi broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://nisshi/ >"$dir/broker.log" 2>&1 &
  wait_port 127.0.0.1 9092 30 nisshi
}

ensure_redis() {
  if port_open 127.0.0.1 6379; then
    log "Redis is up on 127.0.0.1:6379"
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "Redis is not installed: install it (apt-get install redis-server) and run this again"
    return 1
  fi
  log "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 127.0.0.1 6379 30 redis
}

# Build and test tools beyond cargo: OpenSSL headers for the `kafka-tls` feature (librdkafka
# links the system's OpenSSL), the openssl command (the Kafka TLS test makes a certificate)
# and Node.js with npm (the Service Bus stand-in is checked with Microsoft's REST client).
ensure_tools() {
  local missing=0
  if ! pkg-config --exists openssl 2>/dev/null; then
    log "OpenSSL development files are missing: apt-get install libssl-dev pkg-config"
    missing=1
  fi
  local tool
  for tool in openssl node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      log "$tool is missing (Debian: apt-get install openssl nodejs npm)"
      missing=1
    fi
  done
  return "$missing"
}
