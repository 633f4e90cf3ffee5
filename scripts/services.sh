#!/usr/bin/env bash
# Brings up what the tests talk to: PostgreSQL (127.0.0.1:5432, trust
# auth, database `test`), MariaDB (127.0.0.1:3306, root without password,
# database `test`) and Redis (127.0.0.1:6379). Starts each one that is not
# answering, installs it from Debian's packages if it is missing, and waits
# until it answers; installs Debian's chromium and chromium-driver for the
# browser test (unless given `--no-browser`: the benchmark needs only the
# databases). Idempotent: on a machine where all three run it only checks.
set -euo pipefail

browser=1
case "${1:-}" in
  "") ;;
  --no-browser) browser=0 ;;
  *) printf 'usage: %s [--no-browser]\n' "$0" >&2; exit 2 ;;
esac

log() { printf 'services: %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "cannot install $* without root; install it and run again"
    return 1
  fi
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # name, command...
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$name did not answer within 30 s"
  return 1
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }
ensure_redis() {
  command -v redis-cli >/dev/null 2>&1 && redis_up && return 0
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
  redis_up && return 0
  log "starting redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for redis redis_up
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  if ! postgres_up; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
      log "creating PostgreSQL $version cluster"
      pg_createcluster "$version" main >/dev/null
    fi
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      # Trust on loopback only, as the test servers of this project expect.
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for postgres postgres_up
  fi
  if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
    log "creating database test"
    psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null 2>&1 \
      || su postgres -c 'createdb test' || true
  fi
}

mariadb_up() { mariadb -h 127.0.0.1 -P 3306 -uroot -e 'select 1'; }
ensure_mariadb() {
  if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
    apt_install mariadb-server mariadb-client
  fi
  if ! mariadb_up >/dev/null 2>&1; then
    if ! mariadb -uroot -e 'select 1' >/dev/null 2>&1; then
      log "starting MariaDB"
      mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
      start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
      wait_for mariadb mariadb -uroot -e 'select 1'
    fi
    # A fresh install lets root in over the socket only: allow loopback TCP
    # without a password, as the tests expect.
    mariadb -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES;" 2>/dev/null || true
    wait_for mariadb mariadb_up
  fi
  mariadb -h 127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test'
}

ensure_browser() {
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver
  fi
}

ensure_redis
ensure_postgres
ensure_mariadb
if [ "$browser" = 1 ]; then
  ensure_browser
  log "PostgreSQL, MariaDB and Redis answer on 127.0.0.1; Chromium and chromedriver are installed"
else
  log "PostgreSQL, MariaDB and Redis answer on 127.0.0.1"
fi
