#!/usr/bin/env bash
# Development and test services for kafka-saga, without Docker: a single-node Apache Kafka broker
# (KRaft, resolved from Maven Central with scripts/kafka/pom.xml and launched with `java`) and a
# private PostgreSQL cluster (Debian's packages, our own data dir and port; the system cluster is
# never used).
#
# Usage: scripts/services.sh start|stop|status|env|restart-kafka|restart-postgres
#                            |start-kafka|stop-kafka|start-postgres|stop-postgres
#                            |start-cluster|stop-cluster|cluster-status|cluster-env
#                            |kill-broker N|start-broker N
#
#   start             start both (idempotent; returns once both really serve clients)
#   stop              stop what this script started (by pid; never touches other processes)
#   status            print each service's state (exit 0 when both answer, 3 otherwise)
#   env               print `export KAFKA_BOOTSTRAP_SERVERS=...` / `export SAGA_DATABASE_URL=...`
#   restart-kafka     stop then start the broker, keeping its data (reliability tests use it)
#   restart-postgres  stop then start PostgreSQL, keeping its data
#   start-cluster     start a 3-broker KRaft cluster beside the single broker (idempotent; returns once
#                     it serves clients: replication factor 3, min.insync.replicas=2)
#   stop-cluster      stop the cluster brokers this script started (by pid)
#   cluster-status    print each cluster broker's state (exit 0 when all three run, 3 otherwise)
#   cluster-env       print `export KAFKA_SAGA_CLUSTER_BOOTSTRAP=host:port,host:port,host:port`
#   kill-broker N     SIGKILL cluster broker N (1-3), as a crash would (fault tests use it)
#   start-broker N    start cluster broker N again with its data; returns once it logged its start
#
# Environment (all optional):
#   KAFKA_SAGA_SERVICES_DIR   cache dir for jars, data, logs, pid files (~/.cache/kafka-saga)
#   KAFKA_SAGA_KAFKA_PORT     broker port on 127.0.0.1 (19092)
#   KAFKA_SAGA_KAFKA_CONTROLLER_PORT  KRaft controller port (broker port + 1)
#   KAFKA_SAGA_PG_PORT        PostgreSQL port on 127.0.0.1 (15432)
#   KAFKA_SAGA_KAFKA_VERSION  Apache Kafka release (DEFAULT_KAFKA_VERSION below)
#   KAFKA_SAGA_KAFKA_HEAP_OPTS  JVM heap flags for the broker (-Xms128m -Xmx384m)
#   KAFKA_SAGA_PYTHON         Python with aiokafka, for the readiness check (python3)
#   KAFKA_SAGA_READY_TIMEOUT  seconds to wait for a service to serve clients (300: a broker holding
#                             thousands of partitions takes a minute or more to load them)
#   KAFKA_SAGA_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL on stop (30)
#   KAFKA_SAGA_CLUSTER_PORT   base port of the cluster (19200): broker N listens on base+N and its
#                             controller on base+10+N
#   KAFKA_SAGA_CLUSTER_HEAP_OPTS  JVM heap flags of each cluster broker (-Xms128m -Xmx256m)
#
# Layout of the cache dir:
#   kafka-libs/<version>/            broker jars (Maven copy-dependencies, runtime scope)
#   kafka-<port>/                    server.properties, data/, logs/, kafka.pid, kafka.out
#   cluster-<base port>/node<N>/     one cluster broker: server.properties, data/, logs/, kafka.pid
#   cluster-<base port>/cluster-id   the KRaft cluster id all three are formatted with
#   postgres-<port>/                 data/ and postgres.log; when running as root and the postgres
#                                    OS user cannot reach the cache dir (e.g. it is under /root,
#                                    mode 700), they live in /var/lib/postgresql/kafka-saga/<id>/
#                                    instead and postgres-<port>/datadir says where.
set -euo pipefail

# Pinned release; keep in sync with scripts/kafka/pom.xml and docker-compose.yml.
readonly DEFAULT_KAFKA_VERSION="4.3.1"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly POM="$SCRIPT_DIR/kafka/pom.xml"
readonly LOG4J_CONF="$SCRIPT_DIR/kafka/log4j2.properties"
readonly READY_PY="$SCRIPT_DIR/kafka_ready.py"

readonly KAFKA_VERSION="${KAFKA_SAGA_KAFKA_VERSION:-$DEFAULT_KAFKA_VERSION}"
readonly KAFKA_HOST="127.0.0.1"
readonly KAFKA_PORT="${KAFKA_SAGA_KAFKA_PORT:-19092}"
readonly KAFKA_CONTROLLER_PORT="${KAFKA_SAGA_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
readonly KAFKA_HEAP_OPTS="${KAFKA_SAGA_KAFKA_HEAP_OPTS:--Xms128m -Xmx384m}"
readonly PG_HOST="127.0.0.1"
readonly PG_PORT="${KAFKA_SAGA_PG_PORT:-15432}"
readonly PG_USER="saga" PG_PASSWORD="saga" PG_DATABASE="saga_test"
readonly PYTHON="${KAFKA_SAGA_PYTHON:-python3}"
readonly READY_TIMEOUT="${KAFKA_SAGA_READY_TIMEOUT:-300}"
readonly STOP_TIMEOUT="${KAFKA_SAGA_STOP_TIMEOUT:-30}"

CACHE_DIR="${KAFKA_SAGA_SERVICES_DIR:-${HOME:-/root}/.cache/kafka-saga}"
readonly CACHE_DIR
readonly KAFKA_LIBS="$CACHE_DIR/kafka-libs/$KAFKA_VERSION"
readonly KAFKA_DIR="$CACHE_DIR/kafka-$KAFKA_PORT"
readonly KAFKA_DATA="$KAFKA_DIR/data"
readonly KAFKA_LOGS="$KAFKA_DIR/logs"
readonly KAFKA_PROPS="$KAFKA_DIR/server.properties"
readonly KAFKA_PID="$KAFKA_DIR/kafka.pid"
readonly KAFKA_OUT="$KAFKA_DIR/kafka.out"
readonly KAFKA_SERVER_LOG="$KAFKA_LOGS/kafka-server.log"
readonly PG_DIR="$CACHE_DIR/postgres-$PG_PORT"
readonly PG_SOCKET_DIR="/tmp/kafka-saga-pg.$PG_PORT"

log() { printf '[services %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# helpers

# port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# alive PID: the process exists and is not a zombie waiting for its (re)parent to reap it.
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# pid_matches PIDFILE PATTERN: true when PIDFILE names a live process whose command line
# contains PATTERN (guards against a recycled pid after a reboot or crash).
pid_matches() {
    local pidfile=$1 pattern=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$pattern"* ]]
}

# stop_pid PID NAME: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_pid() {
    local pid=$1 name=$2 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while alive "$pid"; do
        if ((waited >= STOP_TIMEOUT * 10)); then
            log "$name (pid $pid) still alive after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

with_lock() {
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.services.lock"
    if ! flock -n 9; then
        log "another services.sh holds $CACHE_DIR/.services.lock; waiting"
        flock -w 900 9 || die "could not take $CACHE_DIR/.services.lock within 900 s"
    fi
}

require_root_for_apt() {
    [[ $EUID -eq 0 ]] || die "$1 is missing; install it (as root: apt-get install -y $2) and rerun"
}

APT_UPDATED=0
apt_install() {
    require_root_for_apt "$1" "${*:2}"
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y ${*:2}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${@:2}" >&2
}

# ---------------------------------------------------------------------------------------------
# Kafka

kafka_ours_running() { pid_matches "$KAFKA_PID" "$KAFKA_PROPS"; }

# kafka_answers [--quick] [timeout]: the readiness check in scripts/kafka_ready.py.
kafka_answers() {
    local args=()
    if [[ ${1:-} == --quick ]]; then args+=(--quick); shift; fi
    "$PYTHON" "$READY_PY" "$KAFKA_HOST:$KAFKA_PORT" --timeout "${1:-$READY_TIMEOUT}" "${args[@]}"
}

ensure_java() {
    if ! command -v java >/dev/null; then
        apt_install java openjdk-17-jre-headless
    fi
    local major
    major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    [[ ${major%%.*} -ge 17 ]] || die "Kafka $KAFKA_VERSION needs Java 17 or newer; found Java $major"
}

kafka_resolve() {
    local stamp want
    want="$KAFKA_VERSION $(sha256sum "$POM" | cut -c1-16)"
    stamp="$KAFKA_LIBS/.resolved"
    if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || apt_install mvn maven
    log "resolving Apache Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS"
    local tmp="$KAFKA_LIBS.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! mvn -B -q -f "$POM" -Dkafka.version="$KAFKA_VERSION" -Dkafka.libs.dir="$tmp" \
            -Dkafka.build.dir="$tmp/.build" package >"$tmp.mvn.log" 2>&1; then
        tail -n 40 "$tmp.mvn.log" >&2
        rm -rf "$tmp"
        die "Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $tmp.mvn.log)"
    fi
    rm -rf "$tmp/.build" "$tmp.mvn.log"
    ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null || die "kafka_2.13-$KAFKA_VERSION.jar missing after resolution"
    echo "$want" >"$tmp/.resolved"
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    mv "$tmp" "$KAFKA_LIBS"
    log "resolved $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars"
}

# JVM flags shared by the storage tool and the broker (G1 settings from kafka-run-class.sh).
kafka_jvm_flags() {
    local heap
    read -r -a heap <<<"$KAFKA_HEAP_OPTS"
    KAFKA_JVM=(java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
        -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
        -Dkafka.logs.dir="$KAFKA_LOGS" -Dlog4j2.configurationFile="$LOG4J_CONF"
        -cp "$KAFKA_LIBS/*")
}

kafka_java() {
    kafka_jvm_flags
    "${KAFKA_JVM[@]}" "$@"
}

kafka_write_props() {
    mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS"
    cat >"$KAFKA_PROPS.tmp" <<EOF
# Generated by scripts/services.sh on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=4
auto.create.topics.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=104857600
EOF
    mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

kafka_format() {
    if [[ -f $KAFKA_DATA/meta.properties ]]; then
        local formatted_with
        formatted_with=$(cat "$KAFKA_DIR/formatted-with" 2>/dev/null || echo unknown)
        if [[ $formatted_with == "$KAFKA_VERSION" ]]; then
            return 0
        fi
        log "Kafka data in $KAFKA_DATA was formatted by Kafka $formatted_with, not $KAFKA_VERSION: wiping it"
        rm -rf "$KAFKA_DATA"
        mkdir -p "$KAFKA_DATA"
    fi
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$KAFKA_OUT" | tail -n 1)
    [[ -n $cluster_id ]] || die "kafka.tools.StorageTool random-uuid printed nothing (see $KAFKA_OUT)"
    log "formatting KRaft storage in $KAFKA_DATA (cluster id $cluster_id)"
    if ! kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" >>"$KAFKA_OUT" 2>&1; then
        tail -n 20 "$KAFKA_OUT" >&2
        die "kafka.tools.StorageTool format failed (see $KAFKA_OUT)"
    fi
    echo "$KAFKA_VERSION" >"$KAFKA_DIR/formatted-with"
}

# kafka_logged_started OFFSET: the broker log, from byte OFFSET on, says the server started.
kafka_logged_started() {
    [[ -f $KAFKA_SERVER_LOG ]] || return 1
    local offset=$1 count
    # The log was rolled over meanwhile: read the new file from its start.
    (($(stat -c %s "$KAFKA_SERVER_LOG") >= offset)) || offset=0
    # grep -c reads all its input (grep -q would SIGPIPE tail, and pipefail would call it a miss).
    count=$(tail -c +"$((offset + 1))" "$KAFKA_SERVER_LOG" | grep -c 'Kafka Server started' || true)
    ((count > 0))
}

kafka_start() {
    "$PYTHON" -c 'import aiokafka' 2>/dev/null ||
        die "$PYTHON cannot import aiokafka, which the readiness check needs (pip install 'aiokafka>=0.14'; or set KAFKA_SAGA_PYTHON)"
    if kafka_ours_running; then
        if kafka_answers --quick 5 2>/dev/null; then
            log "Kafka already running (pid $(<"$KAFKA_PID")) on $KAFKA_HOST:$KAFKA_PORT"
            return 0
        fi
        log "Kafka (pid $(<"$KAFKA_PID")) is running but not answering yet; waiting for it"
        kafka_answers || die "Kafka (pid $(<"$KAFKA_PID")) does not serve clients; see $KAFKA_SERVER_LOG"
        return 0
    fi
    if port_open "$KAFKA_PORT"; then
        if kafka_answers --quick 5 2>/dev/null; then
            log "something not started by this script already serves Kafka on $KAFKA_HOST:$KAFKA_PORT: reusing it"
            return 0
        fi
        die "port $KAFKA_PORT is taken by something that does not speak Kafka; set KAFKA_SAGA_KAFKA_PORT"
    fi
    if port_open "$KAFKA_CONTROLLER_PORT"; then
        die "controller port $KAFKA_CONTROLLER_PORT is taken; set KAFKA_SAGA_KAFKA_CONTROLLER_PORT"
    fi

    ensure_java
    kafka_resolve
    kafka_write_props
    kafka_format
    rm -f "$KAFKA_PID"

    local log_offset=0
    if [[ -f $KAFKA_SERVER_LOG ]]; then log_offset=$(stat -c %s "$KAFKA_SERVER_LOG"); fi
    log "starting Kafka $KAFKA_VERSION on $KAFKA_HOST:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)"
    {
        echo "==== $(date -Is) starting Kafka $KAFKA_VERSION"
    } >>"$KAFKA_OUT"
    # setsid: own session, so a Ctrl-C in the caller's terminal or the end of a test run does not
    # reach the broker; fd 9 (our lock) must not leak into the long-lived process.
    kafka_jvm_flags
    setsid nohup "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_PROPS" </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
    local pid=$!
    echo "$pid" >"$KAFKA_PID"

    local deadline=$((SECONDS + READY_TIMEOUT))
    until kafka_logged_started "$log_offset"; do
        if ! alive "$pid"; then
            rm -f "$KAFKA_PID"
            log "Kafka exited during startup; last lines of its logs:"
            tail -n 15 "$KAFKA_OUT" >&2 || true
            if [[ -f $KAFKA_SERVER_LOG ]]; then
                tail -c +"$((log_offset + 1))" "$KAFKA_SERVER_LOG" | grep -E 'ERROR|FATAL|Exception' | tail -n 15 >&2 || true
            fi
            die "Kafka failed to start (logs: $KAFKA_SERVER_LOG, $KAFKA_OUT)"
        fi
        if ((SECONDS >= deadline)); then
            die "Kafka (pid $pid) did not log 'Kafka Server started' within ${READY_TIMEOUT}s; see $KAFKA_SERVER_LOG (it is left running: scripts/services.sh stop ends it)"
        fi
        sleep 0.2
    done
    log "Kafka logged 'Kafka Server started'; checking produce/consume/commit"
    local left=$((deadline - SECONDS))
    if ((left < 15)); then left=15; fi
    kafka_answers "$left" || die "Kafka (pid $pid) started but does not serve clients; see $KAFKA_SERVER_LOG"
    log "Kafka ready on $KAFKA_HOST:$KAFKA_PORT (pid $pid)"
}

kafka_stop() {
    if kafka_ours_running; then
        local pid
        pid=$(<"$KAFKA_PID")
        log "stopping Kafka (pid $pid)"
        stop_pid "$pid" Kafka
        log "Kafka stopped"
    else
        log "Kafka: nothing of ours to stop"
    fi
    rm -f "$KAFKA_PID"
}

kafka_status() {
    if kafka_ours_running; then
        if kafka_answers --quick 5 2>/dev/null; then
            echo "kafka: running (pid $(<"$KAFKA_PID"), $KAFKA_HOST:$KAFKA_PORT, Apache Kafka $KAFKA_VERSION, data $KAFKA_DATA)"
            return 0
        fi
        echo "kafka: started but not answering (pid $(<"$KAFKA_PID"), $KAFKA_HOST:$KAFKA_PORT; log $KAFKA_SERVER_LOG)"
        return 1
    fi
    if port_open "$KAFKA_PORT"; then
        echo "kafka: answering on $KAFKA_HOST:$KAFKA_PORT but not started by this script"
        return 0
    fi
    echo "kafka: stopped"
    return 1
}

# ---------------------------------------------------------------------------------------------
# A 3-broker KRaft cluster (each node broker and controller), for the fault tests that kill a broker

readonly CLUSTER_BASE_PORT="${KAFKA_SAGA_CLUSTER_PORT:-19200}"
readonly CLUSTER_HEAP_OPTS="${KAFKA_SAGA_CLUSTER_HEAP_OPTS:--Xms128m -Xmx256m}"
readonly CLUSTER_DIR="$CACHE_DIR/cluster-$CLUSTER_BASE_PORT"
readonly CLUSTER_NODES=(1 2 3)

node_port() { echo $((CLUSTER_BASE_PORT + $1)); }
node_controller_port() { echo $((CLUSTER_BASE_PORT + 10 + $1)); }
node_dir() { echo "$CLUSTER_DIR/node$1"; }
node_pidfile() { echo "$CLUSTER_DIR/node$1/kafka.pid"; }
node_props() { echo "$CLUSTER_DIR/node$1/server.properties"; }
node_log() { echo "$CLUSTER_DIR/node$1/logs/kafka-server.log"; }
node_running() { pid_matches "$(node_pidfile "$1")" "$(node_props "$1")"; }

cluster_bootstrap() {
    local n out=()
    for n in "${CLUSTER_NODES[@]}"; do out+=("$KAFKA_HOST:$(node_port "$n")"); done
    local IFS=,
    echo "${out[*]}"
}

cluster_voters() {
    local n out=()
    for n in "${CLUSTER_NODES[@]}"; do out+=("$n@$KAFKA_HOST:$(node_controller_port "$n")"); done
    local IFS=,
    echo "${out[*]}"
}

check_node() {
    [[ ${1:-} =~ ^[123]$ ]] || die "broker number must be 1, 2 or 3, got '${1:-}'"
}

node_write_props() {
    local n=$1 dir props
    dir=$(node_dir "$n")
    props=$(node_props "$n")
    mkdir -p "$dir/data" "$dir/logs"
    cat >"$props.tmp" <<EOF
# Generated by scripts/services.sh on every start; edits are lost.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(cluster_voters)
listeners=PLAINTEXT://$KAFKA_HOST:$(node_port "$n"),CONTROLLER://$KAFKA_HOST:$(node_controller_port "$n")
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$(node_port "$n")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=4
auto.create.topics.enable=true
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
unclean.leader.election.enable=false
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
replica.lag.time.max.ms=10000
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=104857600
EOF
    mv "$props.tmp" "$props"
}

node_format() {
    local n=$1 dir cluster_id other
    dir=$(node_dir "$n")
    if [[ -f $dir/data/meta.properties && $(cat "$dir/formatted-with" 2>/dev/null) == "$KAFKA_VERSION" ]]; then
        return 0
    fi
    cluster_id=$(cat "$CLUSTER_DIR/cluster-id" 2>/dev/null || true)
    if [[ -z $cluster_id || $(cat "$CLUSTER_DIR/cluster-version" 2>/dev/null) != "$KAFKA_VERSION" ]]; then
        cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$dir/kafka.out" | tail -n 1)
        [[ -n $cluster_id ]] || die "kafka.tools.StorageTool random-uuid printed nothing (see $dir/kafka.out)"
        # A new cluster id: every node is formatted again with it.
        for other in "${CLUSTER_NODES[@]}"; do
            rm -rf "$(node_dir "$other")/data" "$(node_dir "$other")/formatted-with"
        done
        echo "$cluster_id" >"$CLUSTER_DIR/cluster-id"
        echo "$KAFKA_VERSION" >"$CLUSTER_DIR/cluster-version"
    fi
    rm -rf "$dir/data"
    mkdir -p "$dir/data"
    log "formatting KRaft storage of cluster broker $n (cluster id $cluster_id)"
    if ! kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$(node_props "$n")" >>"$dir/kafka.out" 2>&1; then
        tail -n 20 "$dir/kafka.out" >&2
        die "kafka.tools.StorageTool format failed for cluster broker $n (see $dir/kafka.out)"
    fi
    echo "$KAFKA_VERSION" >"$dir/formatted-with"
}

# node_launch N: start broker N in the background, without waiting for it.
node_launch() {
    local n=$1 dir heap pid log_offset=0
    dir=$(node_dir "$n")
    if port_open "$(node_port "$n")" || port_open "$(node_controller_port "$n")"; then
        die "port $(node_port "$n") or $(node_controller_port "$n") of cluster broker $n is taken; set KAFKA_SAGA_CLUSTER_PORT"
    fi
    node_write_props "$n"
    node_format "$n"
    if [[ -f $(node_log "$n") ]]; then log_offset=$(stat -c %s "$(node_log "$n")"); fi
    echo "$log_offset" >"$dir/log-offset"
    log "starting cluster broker $n on $KAFKA_HOST:$(node_port "$n") (controller $(node_controller_port "$n"))"
    echo "==== $(date -Is) starting Kafka $KAFKA_VERSION (cluster broker $n)" >>"$dir/kafka.out"
    read -r -a heap <<<"$CLUSTER_HEAP_OPTS"
    # setsid and fd 9 closed: as for the single broker (kafka_start).
    setsid nohup java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dkafka.logs.dir="$dir/logs" -Dlog4j2.configurationFile="$LOG4J_CONF" -cp "$KAFKA_LIBS/*" \
        kafka.Kafka "$(node_props "$n")" </dev/null >>"$dir/kafka.out" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$(node_pidfile "$n")"
}

# node_wait_started N: until broker N logs 'Kafka Server started'; fails with its log if it exits.
node_wait_started() {
    local n=$1 dir pid offset count deadline=$((SECONDS + READY_TIMEOUT))
    dir=$(node_dir "$n")
    pid=$(<"$(node_pidfile "$n")")
    offset=$(cat "$dir/log-offset" 2>/dev/null || echo 0)
    while true; do
        if [[ -f $(node_log "$n") ]]; then
            (($(stat -c %s "$(node_log "$n")") >= offset)) || offset=0
            count=$(tail -c +"$((offset + 1))" "$(node_log "$n")" | grep -c 'Kafka Server started' || true)
            if ((count > 0)); then return 0; fi
        fi
        if ! alive "$pid"; then
            rm -f "$(node_pidfile "$n")"
            tail -n 15 "$dir/kafka.out" >&2 || true
            die "cluster broker $n exited during startup (logs: $(node_log "$n"), $dir/kafka.out)"
        fi
        ((SECONDS < deadline)) || die "cluster broker $n (pid $pid) did not start within ${READY_TIMEOUT}s"
        sleep 0.2
    done
}

cluster_start() {
    "$PYTHON" -c 'import aiokafka' 2>/dev/null ||
        die "$PYTHON cannot import aiokafka, which the readiness check needs (or set KAFKA_SAGA_PYTHON)"
    ensure_java
    kafka_resolve
    mkdir -p "$CLUSTER_DIR"
    local n started=()
    for n in "${CLUSTER_NODES[@]}"; do
        if node_running "$n"; then
            log "cluster broker $n already running (pid $(<"$(node_pidfile "$n")"))"
        else
            node_launch "$n"
            started+=("$n")
        fi
    done
    # The quorum needs two of the three controllers: launch all first, then wait for each.
    for n in "${started[@]}"; do node_wait_started "$n"; done
    log "cluster brokers up; checking produce/consume/commit on a topic replicated three times"
    "$PYTHON" "$READY_PY" "$(cluster_bootstrap)" --timeout "$READY_TIMEOUT" --replicas 3 ||
        die "the cluster does not serve clients; see $CLUSTER_DIR/node*/logs/kafka-server.log"
    log "cluster ready on $(cluster_bootstrap)"
}

cluster_stop() {
    local n pid
    # SIGTERM all at once: a broker shutting down alone waits to hand its leaderships to the others.
    for n in "${CLUSTER_NODES[@]}"; do
        if node_running "$n"; then kill -TERM "$(<"$(node_pidfile "$n")")" 2>/dev/null || true; fi
    done
    for n in "${CLUSTER_NODES[@]}"; do
        if node_running "$n"; then
            pid=$(<"$(node_pidfile "$n")")
            log "stopping cluster broker $n (pid $pid)"
            stop_pid "$pid" "cluster broker $n"
        fi
        rm -f "$(node_pidfile "$n")"
    done
    log "cluster: nothing of ours left running"
}

node_kill() {
    local n=$1 pid
    if node_running "$n"; then
        pid=$(<"$(node_pidfile "$n")")
        log "SIGKILL cluster broker $n (pid $pid)"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.05; done
    else
        log "cluster broker $n is not running"
    fi
    rm -f "$(node_pidfile "$n")"
}

node_start() {
    local n=$1
    ensure_java
    kafka_resolve
    mkdir -p "$CLUSTER_DIR"
    if node_running "$n"; then
        log "cluster broker $n already running (pid $(<"$(node_pidfile "$n")"))"
        return 0
    fi
    node_launch "$n"
    node_wait_started "$n"
    log "cluster broker $n started (pid $(<"$(node_pidfile "$n")"))"
}

cluster_status() {
    local n rc=0
    for n in "${CLUSTER_NODES[@]}"; do
        if node_running "$n"; then
            echo "cluster broker $n: running (pid $(<"$(node_pidfile "$n")"), $KAFKA_HOST:$(node_port "$n"))"
        else
            echo "cluster broker $n: stopped"
            rc=3
        fi
    done
    return $rc
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

PG_BIN=""
PG_DATA=""
PG_LOG=""

find_pg_bin() {
    local d
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4 -V -r); do
        if [[ -x $d/pg_ctl && -x $d/initdb && -x $d/postgres ]]; then
            PG_BIN=$d
            return 0
        fi
    done
    return 1
}

pg_ensure_installed() {
    if ! find_pg_bin; then
        apt_install "PostgreSQL (pg_ctl, initdb)" postgresql postgresql-contrib
        find_pg_bin || die "PostgreSQL binaries still missing under /usr/lib/postgresql/*/bin after apt-get install"
    fi
}

# as_pg CMD...: run as the postgres OS user when we are root (PostgreSQL refuses to run as root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# pg_locate [--create]: decides where the data dir lives (see the header) and sets PG_DATA and
# PG_LOG. Only `start` passes --create, which records the choice and may clean up stale data.
pg_locate() {
    local base create=${1:-}
    if [[ -f $PG_DIR/datadir ]]; then
        base=$(<"$PG_DIR/datadir")
    else
        base="$PG_DIR"
        if [[ $EUID -eq 0 ]]; then
            id postgres >/dev/null 2>&1 || die "no 'postgres' OS user; is PostgreSQL installed?"
            if [[ $create == --create ]]; then mkdir -p "$PG_DIR"; fi
            local probe="$PG_DIR"
            while [[ ! -e $probe ]]; do probe=$(dirname "$probe"); done
            if ! runuser -u postgres -- test -x "$probe" 2>/dev/null; then
                local key
                key=$(realpath -m "$PG_DIR" | sha256sum | cut -c1-12)
                base="$(getent passwd postgres | cut -d: -f6)/kafka-saga/$key"
                # Data left there by a cache dir that was since deleted: start afresh, unless a
                # server still runs on it.
                if [[ $create == --create && -d $base/data ]] &&
                    ! as_pg "$PG_BIN/pg_ctl" status -D "$base/data" >/dev/null 2>&1; then
                    log "removing stale PostgreSQL data in $base (its cache dir entry is gone)"
                    rm -rf "$base"
                fi
            fi
        fi
        if [[ $create == --create ]]; then
            mkdir -p "$PG_DIR"
            echo "$base" >"$PG_DIR/datadir"
        fi
    fi
    PG_DATA="$base/data"
    PG_LOG="$base/postgres.log"
}

pg_ours_running() {
    [[ -n $PG_BIN && -f $PG_DATA/postmaster.pid ]] || return 1
    as_pg "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_answers() {
    pg_isready_cmd -t "${1:-2}" >/dev/null 2>&1
}

pg_isready_cmd() {
    local bin=pg_isready
    [[ -n $PG_BIN && -x $PG_BIN/pg_isready ]] && bin=$PG_BIN/pg_isready
    "$bin" -h "$PG_HOST" -p "$PG_PORT" -d postgres "$@"
}

pg_initdb() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    local base
    base=$(dirname "$PG_DATA")
    mkdir -p "$base"
    [[ $EUID -eq 0 ]] && chown postgres:postgres "$base" && chmod 700 "$base"
    log "initdb $PG_DATA"
    if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=scram-sha-256 >"$base/initdb.log" 2>&1; then
        cat "$base/initdb.log" >&2
        die "initdb failed"
    fi
    as_pg tee "$PG_DATA/kafka_saga.conf" >/dev/null <<'EOF'
# Written once by scripts/services.sh. listen_addresses, port and the socket directory are
# passed on the pg_ctl command line at every start.
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
pg_stat_statements.max = 10000
max_connections = 200
fsync = on
synchronous_commit = on
password_encryption = 'scram-sha-256'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    echo "include_if_exists = 'kafka_saga.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_bootstrap_sql() {
    as_pg "$PG_BIN/psql" -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres -X -q \
        -v ON_ERROR_STOP=1 >/dev/null <<EOF
SET client_min_messages = warning;
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
GRANT pg_monitor TO $PG_USER;
SELECT 'CREATE DATABASE $PG_DATABASE OWNER $PG_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DATABASE') \gexec
\c $PG_DATABASE
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
GRANT EXECUTE ON FUNCTION pg_stat_statements_reset(oid, oid, bigint) TO $PG_USER;
EOF
}

pg_start() {
    pg_ensure_installed
    pg_locate --create
    if pg_ours_running; then
        if pg_answers 2; then
            log "PostgreSQL already running (pid $(head -n 1 "$PG_DATA/postmaster.pid")) on $PG_HOST:$PG_PORT"
            return 0
        fi
        log "PostgreSQL (data $PG_DATA) is running but not answering yet; waiting"
        pg_wait_ready
        return 0
    fi
    if pg_answers 2 || port_open "$PG_PORT"; then
        if pg_answers 5; then
            log "something not started by this script already serves PostgreSQL on $PG_HOST:$PG_PORT: reusing it"
            return 0
        fi
        die "port $PG_PORT is taken by something that does not answer pg_isready; set KAFKA_SAGA_PG_PORT"
    fi

    pg_initdb
    mkdir -p "$PG_SOCKET_DIR"
    if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$PG_SOCKET_DIR"; fi
    chmod 700 "$PG_SOCKET_DIR"
    log "starting PostgreSQL ($("$PG_BIN/postgres" --version | awk '{print $3}')) on $PG_HOST:$PG_PORT, data $PG_DATA"
    if ! as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$READY_TIMEOUT" \
            -o "-c listen_addresses=$PG_HOST -p $PG_PORT -k $PG_SOCKET_DIR" >/dev/null 9>&-; then
        tail -n 20 "$PG_LOG" >&2 || true
        die "pg_ctl start failed (log: $PG_LOG)"
    fi
    pg_wait_ready
    pg_bootstrap_sql || die "could not create role $PG_USER / database $PG_DATABASE (log: $PG_LOG)"
    log "PostgreSQL ready on $PG_HOST:$PG_PORT (pid $(head -n 1 "$PG_DATA/postmaster.pid"))"
}

pg_wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    until pg_answers 2; do
        ((SECONDS < deadline)) || die "PostgreSQL on $PG_HOST:$PG_PORT did not answer pg_isready within ${READY_TIMEOUT}s (log: $PG_LOG)"
        sleep 0.2
    done
}

pg_stop() {
    if ! find_pg_bin; then
        log "PostgreSQL: not installed, nothing to stop"
        return 0
    fi
    pg_locate
    if pg_ours_running; then
        log "stopping PostgreSQL (pid $(head -n 1 "$PG_DATA/postmaster.pid"))"
        if ! as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t "$STOP_TIMEOUT" >/dev/null; then
            log "fast shutdown did not finish in ${STOP_TIMEOUT}s: immediate shutdown"
            as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30 >/dev/null || true
        fi
        log "PostgreSQL stopped"
    else
        log "PostgreSQL: nothing of ours to stop"
    fi
}

pg_status() {
    find_pg_bin || true
    if [[ -n $PG_BIN ]]; then
        pg_locate
        if pg_ours_running; then
            local pid
            pid=$(head -n 1 "$PG_DATA/postmaster.pid")
            if pg_answers 2; then
                echo "postgres: running (pid $pid, $PG_HOST:$PG_PORT, $("$PG_BIN/postgres" --version | awk '{print $3}'), data $PG_DATA)"
                return 0
            fi
            echo "postgres: started but not answering (pid $pid, $PG_HOST:$PG_PORT; log $PG_LOG)"
            return 1
        fi
    fi
    if pg_answers 2; then
        echo "postgres: answering on $PG_HOST:$PG_PORT but not started by this script"
        return 0
    fi
    echo "postgres: stopped"
    return 1
}

# ---------------------------------------------------------------------------------------------

print_env() {
    echo "export KAFKA_BOOTSTRAP_SERVERS=$KAFKA_HOST:$KAFKA_PORT"
    echo "export SAGA_DATABASE_URL=postgresql+asyncpg://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE"
}

usage() {
    sed -n '7,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    case ${1:-} in
        kill-broker | start-broker)
            [[ $# -eq 2 ]] || usage
            check_node "$2"
            with_lock
            if [[ $1 == kill-broker ]]; then node_kill "$2"; else node_start "$2"; fi
            return 0
            ;;
    esac
    [[ $# -eq 1 ]] || usage
    case $1 in
        start)
            with_lock
            pg_start
            kafka_start
            ;;
        stop)
            with_lock
            kafka_stop
            pg_stop
            ;;
        start-kafka) with_lock; kafka_start ;;
        stop-kafka) with_lock; kafka_stop ;;
        start-postgres) with_lock; pg_start ;;
        stop-postgres) with_lock; pg_stop ;;
        restart-kafka)
            with_lock
            kafka_stop
            kafka_start
            ;;
        restart-postgres)
            with_lock
            pg_stop
            pg_start
            ;;
        status)
            local rc=0
            kafka_status || rc=3
            pg_status || rc=3
            return $rc
            ;;
        env) print_env ;;
        start-cluster) with_lock; cluster_start ;;
        stop-cluster) with_lock; cluster_stop ;;
        cluster-status) cluster_status ;;
        cluster-env) echo "export KAFKA_SAGA_CLUSTER_BOOTSTRAP=$(cluster_bootstrap)" ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
