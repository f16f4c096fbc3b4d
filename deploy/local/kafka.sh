#!/usr/bin/env bash
# Apache Kafka 4.x on 127.0.0.1 (KRaft, every node a combined broker+controller),
# run from Maven Central jars: no Docker, no Kafka tarball. One node, or a
# cluster of KAFKA_BROKERS nodes on ports PORT, PORT+1, ... (all of them voters).
#
#   kafka.sh fetch            populate the jar cache (idempotent; no Maven call when warm)
#   kafka.sh start  [PORT]    fetch if needed, format storage, start the nodes that are down, wait until ready
#   kafka.sh stop   [PORT]    SIGTERM, wait, SIGKILL; idempotent; deletes no data
#   kafka.sh status [PORT]    exit 0 if every node runs, 3 if not
#   kafka.sh logs   [PORT]    tail of the nodes' logs
#   kafka.sh config [PORT]    print the server.properties a start writes for each node (starts nothing)
#   kafka.sh env    [PORT]    QTASKS_* settings for the app user of a secure cluster (KAFKA_SECURITY=sasl_ssl)
#   kafka.sh acl    [PORT] -- ARGS   Kafka's AclCommand as the secure cluster's admin user
#
# PORT defaults to $KAFKA_PORT, else 9092. KAFKA_BROKERS unset: the cluster whose
# first node is on PORT (all its nodes), else one node. A node's own PORT with
# KAFKA_BROKERS=1 starts or stops that node alone (it keeps its cluster settings).
# See README.md for all env vars.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$HERE/pom.xml"
CACHE="${QTASKS_KAFKA_CACHE:-${HOME:-/tmp}/.cache/qtasks-kafka}"
# one jar set per pom: checkouts with different poms share the cache without refetching
LIBS="$CACHE/libs-$(sha256sum "$POM" | cut -c1-12)"
MARKER="$LIBS.pom-sha256"
DATA_ROOT="${QTASKS_KAFKA_DATA:-$PWD/.kafka}"
HEAP="${KAFKA_HEAP:-${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}}"
# Measured on 2 cores (see README): SerialGC + C1-only starts fastest and keeps
# the idle broker light; override with KAFKA_JVM_OPTS="" to get JVM defaults.
JVM_OPTS="${KAFKA_JVM_OPTS--XX:+UseSerialGC -XX:TieredStopAtLevel=1}"
START_TIMEOUT="${QTASKS_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${QTASKS_KAFKA_STOP_TIMEOUT:-30}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
BROKERS="${KAFKA_BROKERS:-}"
# plaintext (default) or sasl_ssl: a SASL_SSL listener with SCRAM-SHA-512 users and an authorizer
SECURITY_ASKED="${KAFKA_SECURITY:-}"
# users made at format time next to admin and qtasks (secure mode), e.g. "reader ci"
SCRAM_USERS="${KAFKA_SCRAM_USERS:-}"
NODES_N=1 # the nodes a command acts on (resolve)
PORT0=""  # the first one's port

die() { echo "kafka.sh: error: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }

# ---------------------------------------------------------------- helpers

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

cache_ok() {
    [[ -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$(pom_hash)" ]] \
        && compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null
}

port_of() {
    local p="${1:-${KAFKA_PORT:-9092}}"
    if ! [[ "$p" =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then die "bad port: '$p'"; fi
    echo "$p"
}

abs_path() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

# resolve [PORT]: the nodes a command acts on, PORT0 .. PORT0+NODES_N-1. KAFKA_BROKERS
# if set; else all the nodes of the cluster whose node 1 is on PORT, else one node.
resolve() {
    local env
    PORT0="$(port_of "${1:-}")"
    if [[ -n "$BROKERS" ]]; then
        [[ "$BROKERS" =~ ^[1-9]$ ]] || die "bad KAFKA_BROKERS: '$BROKERS' (1 to 9)"
        NODES_N="$BROKERS"
    else
        NODES_N=1
        env="$(abs_path "$DATA_ROOT/$PORT0")/cluster.env"
        if [[ -z "${QTASKS_KAFKA_DATA_DIR:-}" && -f "$env" ]] && grep -qx 'NODE_ID=1' "$env"; then
            NODES_N="$(sed -n 's/^NODES=//p' "$env")"
            [[ "$NODES_N" =~ ^[1-9]$ ]] || die "$env is damaged; stop the cluster and remove its data dirs"
        fi
    fi
    ((PORT0 + NODES_N - 1 <= 65535)) || die "ports $PORT0..$((PORT0 + NODES_N - 1)) do not all exist"
}

# the ports of the resolved nodes, one per line
ports_of() {
    local i
    for ((i = 0; i < NODES_N; i++)); do echo $((PORT0 + i)); done
}

# data dir of the node on port $1: $QTASKS_KAFKA_DATA_DIR if set and there is one
# node (exact dir), else $QTASKS_KAFKA_DATA/<port>, else $PWD/.kafka/<port>
data_dir_of() {
    if [[ -n "${QTASKS_KAFKA_DATA_DIR:-}" ]] && [[ "$NODES_N" == 1 ]]; then
        abs_path "$QTASKS_KAFKA_DATA_DIR"
    else
        abs_path "$DATA_ROOT/$1"
    fi
}

# true if something accepts TCP connections on 127.0.0.1:$1
port_open() {
    if command -v timeout >/dev/null; then
        timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# a TCP port on 127.0.0.1 that is free now, below the kernel's ephemeral range (a
# client's outgoing connection never takes it while its node is down and restarting)
free_port() {
    local p low=32768
    if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
        read -r low _ </proc/sys/net/ipv4/ip_local_port_range || low=32768
    fi
    ((low > 11000)) || low=65000
    if command -v python3 >/dev/null && p="$(python3 -c '
import random, socket, sys
low = int(sys.argv[1])
for _ in range(1000):
    port = random.randrange(10000, low)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
' "$low" 2>/dev/null)" && [[ -n "$p" ]]; then
        echo "$p"; return 0
    fi
    for ((p = 10000 + RANDOM % (low - 10000); p < low; p++)); do
        port_open "$p" || { echo "$p"; return 0; }
    done
    die "no free port found"
}

# a free port that is none of the given ones
free_port_except() {
    local p
    while :; do
        p="$(free_port)"
        [[ " $* " == *" $p "* ]] || { echo "$p"; return 0; }
    done
}

# pid of the live broker for data dir $1 (empty if none)
broker_pid() {
    local f="$1/kafka.pid" pid
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    # guard against pid reuse: must be our java running kafka.Kafka on this dir
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $1/server.properties" \
            && echo "$pid"
    elif kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
    return 0
}

log_tail() {
    local dir="$1" n="${2:-40}"
    if [[ -s "$dir/kafka.out" ]]; then
        echo "---- $dir/kafka.out (stdout/stderr, last $n lines) ----"
        tail -n "$n" "$dir/kafka.out"
    fi
    if [[ -f "$dir/server.log" ]]; then
        echo "---- $dir/server.log (last $n lines) ----"
        tail -n "$n" "$dir/server.log"
    fi
    if [[ -s "$dir/format.log" ]] && ! grep -q '^Formatting' "$dir/format.log"; then
        echo "---- $dir/format.log ----"
        tail -n "$n" "$dir/format.log"
    fi
    return 0
}

# ---------------------------------------------------------------- fetch

cmd_fetch() {
    cache_ok && return 0
    mkdir -p "$CACHE"
    # serialise concurrent fetches (parallel test sessions)
    if command -v flock >/dev/null; then
        exec 9>"$CACHE/.fetch.lock"
        flock 9
        if cache_ok; then exec 9>&-; return 0; fi
    fi
    command -v mvn >/dev/null || die "mvn not found: Maven is needed once to fetch the Kafka jars into $LIBS"
    local tmp log="$CACHE/fetch.log" t0=$SECONDS
    tmp="$(mktemp -d "$CACHE/libs.tmp.XXXXXX")"
    say "fetching Kafka jars from Maven Central into $LIBS ..."
    # shellcheck disable=SC2086  # extra args are meant to be word-split
    if ! mvn -B -q -Dstyle.color=never -f "$POM" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" \
        ${QTASKS_KAFKA_MVN_ARGS:-} >"$log" 2>&1; then
        rm -rf "$tmp"
        tail -n 40 "$log" >&2
        die "maven fetch failed (full log: $log)"
    fi
    compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die "maven fetched no kafka_2.13 jar (see $log)"; }
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    pom_hash >"$MARKER"
    exec 9>&- # release the lock; the broker started later must not inherit it
    say "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- start

# write_config DIR PORT CPORT NODE_ID VOTERS NODES [SECURITY]
write_config() {
    local dir="$1" port="$2" cport="$3" id="$4" voters="$5" nodes="$6" security="${7:-plaintext}" rf isr
    # internal topics on every node (up to 3); writes need 2 in-sync copies once there are 3
    rf=$((nodes < 3 ? nodes : 3))
    isr=$((rf >= 3 ? 2 : 1))
    cat >"$dir/server.properties" <<EOF
# generated by deploy/local/kafka.sh -- rewritten on every start
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
EOF
    if [[ "$security" == sasl_ssl ]]; then
        secure_listeners "$dir" "$port" "$cport" >>"$dir/server.properties"
    else
        cat >>"$dir/server.properties" <<EOF
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
    fi
    cat >>"$dir/server.properties" <<EOF
controller.listener.names=CONTROLLER
log.dirs=$dir/logs

# node $id of $nodes
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# a share group may set locks as short as 1 s (default minimum 15 s): lets tests of lock
# expiry and renewal run in seconds; the default lock stays 30 s
group.share.min.record.lock.duration.ms=1000
# and may notice a dead member within 6 s (default minimum 45 s, heartbeats at least 5 s
# apart), as the classic groups' minimum allows: a worker set for it hands its partitions
# on that soon
group.share.min.session.timeout.ms=6000
group.share.min.heartbeat.interval.ms=1000
group.initial.rebalance.delay.ms=0
# one partition for the internal topics: first group join / transaction is faster
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
auto.create.topics.enable=false

# small machine (2 cores)
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=33554432

# make compaction observable in tests
log.cleaner.backoff.ms=1000
EOF
    # the secure mode writes the admin's password here
    chmod 600 "$dir/server.properties"
    if [[ -n "${QTASKS_KAFKA_EXTRA_PROPS:-}" ]]; then
        printf '\n# QTASKS_KAFKA_EXTRA_PROPS (later keys win)\n%s\n' "$QTASKS_KAFKA_EXTRA_PROPS" >>"$dir/server.properties"
    fi
    cat >"$dir/log4j2.properties" <<EOF
# generated by deploy/local/kafka.sh: everything to server.log, nothing to the console
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $dir/server.log
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ${QTASKS_KAFKA_LOG_LEVEL:-INFO}
rootLogger.appenderRef.file.ref = FILE
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

# ---------------------------------------------------------------- secure mode

# security_of DIR: the mode a node's data was made with
security_of() { if [[ -f "$1/security" ]]; then cat "$1/security"; else echo plaintext; fi; }

# security_for DIR: the mode of a new node (KAFKA_SECURITY); a node keeps the mode it was
# made with, and asking for another is an error
security_for() {
    local dir="$1" asked="$SECURITY_ASKED" have
    case "$asked" in "" | plaintext | sasl_ssl) ;; *) die "bad KAFKA_SECURITY: '$asked' (plaintext or sasl_ssl)" ;; esac
    if [[ -f "$dir/logs/meta.properties" || -f "$dir/security" ]]; then
        have="$(security_of "$dir")"
        [[ -z "$asked" || "$asked" == "$have" ]] \
            || die "$dir was made $have, not $asked; stop it and remove its data dir to change (KAFKA_SECURITY=$have)"
        echo "$have"
    else
        echo "${asked:-plaintext}"
    fi
}

# the users of a secure cluster: admin (super user, inter-broker), qtasks (the app), KAFKA_SCRAM_USERS
secure_users() {
    local u
    for u in admin qtasks $SCRAM_USERS; do
        [[ "$u" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad user name in KAFKA_SCRAM_USERS: '$u'"
        echo "$u"
    done | awk '!seen[$0]++'
}

# secure_material DIR: a CA, the brokers' certificate (127.0.0.1 and localhost) and a random
# password per user, made once in DIR/secure with openssl (nothing is downloaded)
secure_material() {
    local dir="$1/secure" u users
    command -v openssl >/dev/null || die "openssl not found: the secure mode makes its certificates with it"
    users="$(secure_users)" || exit 1
    if [[ -f "$1/logs/meta.properties" ]]; then
        for u in $users; do
            [[ -s "$dir/$u.password" ]] \
                || die "user '$u' (KAFKA_SCRAM_USERS) was not made when $1 was formatted; add it with Kafka's tools (kafka-configs --alter --add-config 'SCRAM-SHA-512=[password=...]' --entity-type users --entity-name $u)"
        done
    fi
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [[ ! -f "$dir/ca.crt" || ! -f "$dir/broker.pem" ]]; then
        (
            umask 077
            cd "$dir"
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 825 \
                -keyout ca.key -out ca.crt -subj "/CN=qtasks local CA" \
                -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
                && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
                    -keyout broker.key -out broker.csr -subj "/CN=localhost" \
                && printf '%s\n' "basicConstraints=critical,CA:FALSE" \
                    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" \
                    "subjectAltName=IP:127.0.0.1,DNS:localhost" "authorityKeyIdentifier=keyid" \
                    "subjectKeyIdentifier=hash" >broker.ext \
                && openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
                    -extfile broker.ext -out broker.crt \
                && openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.pk8 \
                && cat broker.pk8 broker.crt ca.crt >broker.pem \
                && rm -f broker.csr broker.pk8 broker.key broker.ext ca.srl
        ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; rm -f "$dir/ca.crt"; die "openssl failed making the certificates"; }
    fi
    (
        umask 077
        for u in $users; do
            [[ -s "$dir/$u.password" ]] || head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$dir/$u.password"
        done
        cat >"$dir/admin.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$dir/admin.password")";
ssl.truststore.type=PEM
ssl.truststore.location=$dir/ca.crt
EOF
    )
}

# share_material FROM TO: a cluster's nodes have the same CA, certificate and users
share_material() {
    mkdir -p "$2/secure"
    chmod 700 "$2/secure"
    cp -p "$1"/secure/*.password "$1/secure/ca.crt" "$1/secure/broker.pem" "$1/secure/admin.properties" "$2/secure/"
}

# secure_listeners DIR PORT CPORT: clients and brokers on SASL_SSL (SCRAM-SHA-512), with an
# authorizer. The controllers talk plaintext on loopback (KRaft takes no SCRAM there), so
# their principal, ANONYMOUS, is a super user: never expose a controller port.
secure_listeners() {
    local dir="$1" port="$2" cport="$3" admin="<admin password>"
    [[ -f "$dir/secure/admin.password" ]] && admin="$(cat "$dir/secure/admin.password")"
    cat <<EOF
listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=SASL_SSL://127.0.0.1:$port
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin";
ssl.keystore.type=PEM
ssl.keystore.location=$dir/secure/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/secure/ca.crt
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:ANONYMOUS
allow.everyone.if.no.acl.found=false
EOF
}

# acl_command DIR ARGS...: Kafka's AclCommand, as admin, against the node of DIR
acl_command() {
    local dir="$1" port
    shift
    port="$(sed -n 's|^advertised.listeners=SASL_SSL://127.0.0.1:||p' "$dir/server.properties")"
    [[ -n "$port" ]] || die "$dir is not a node in secure mode (KAFKA_SECURITY=sasl_ssl)"
    # shellcheck disable=SC2086
    "$JAVA" $JVM_OPTS -Xmx256m -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIBS/*" org.apache.kafka.tools.AclCommand \
        --bootstrap-server "127.0.0.1:$port" --command-config "$dir/secure/admin.properties" "$@"
}

# grant_app DIR: the qtasks user may use every topic, group and transactional id and read the
# cluster's settings, as an app's workers and clients do (once per cluster). All on the groups
# covers share mode too: READ on the share group, and ALTER_CONFIGS to set its settings.
grant_app() {
    local dir="$1"
    [[ -f "$dir/secure/acls-granted" ]] && return 0
    if acl_command "$dir" --add --allow-principal User:qtasks --operation All \
        --topic '*' --group '*' --transactional-id '*' >"$dir/secure/acls.log" 2>&1 \
        && acl_command "$dir" --add --allow-principal User:qtasks --operation Describe \
            --operation DescribeConfigs --operation IdempotentWrite --cluster >>"$dir/secure/acls.log" 2>&1; then
        touch "$dir/secure/acls-granted"
    else
        cat "$dir/secure/acls.log" >&2
        die "granting the qtasks user its ACLs failed"
    fi
}

# random base64url cluster id (16 bytes, 22 chars); not starting with '-'
# so it is never taken for an option
new_cluster_id() {
    local cid="-"
    while [[ "$cid" == -* ]]; do
        cid="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    echo "$cid"
}

# format_storage DIR [CLUSTER_ID]: once per data dir (a cluster's nodes share the id)
format_storage() {
    local dir="$1" cid="${2:-}"
    [[ -f "$dir/logs/meta.properties" ]] && return 0
    [[ -n "$cid" ]] || cid="$(new_cluster_id)"
    local scram=() u users
    if [[ "$(security_of "$dir")" == sasl_ssl ]]; then
        users="$(secure_users)" || exit 1
        for u in $users; do
            scram+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(cat "$dir/secure/$u.password")]")
        done
    fi
    # shellcheck disable=SC2086
    if ! "$JAVA" $JVM_OPTS -Xmx256m \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$cid" -c "$dir/server.properties" "${scram[@]}" >"$dir/format.log" 2>&1; then
        cat "$dir/format.log" >&2
        die "storage format failed (see $dir/format.log)"
    fi
}

# Optional watchdog: when QTASKS_KAFKA_OWNER_PID is set (broker.py sets it),
# stop the broker once that process is gone, so a killed test run leaks no JVM.
start_watchdog() {
    local dir="$1" bpid="$2" owner="${QTASKS_KAFKA_OWNER_PID:-}"
    [[ "$owner" =~ ^[0-9]+$ ]] || return 0
    (
        trap '' INT HUP
        while kill -0 "$bpid" 2>/dev/null; do
            if ! kill -0 "$owner" 2>/dev/null; then
                kill -TERM "$bpid" 2>/dev/null || true
                for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
                    kill -0 "$bpid" 2>/dev/null || exit 0
                    sleep 0.1
                done
                kill -KILL "$bpid" 2>/dev/null || true
                exit 0
            fi
            sleep 1
        done
    ) </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
}

# wait until the broker logged "Kafka Server started" and the port accepts connections
wait_ready() {
    local dir="$1" port="$2" pid="$3" deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$dir" >&2
            die "broker (pid $pid) exited during startup"
        fi
        if grep -q 'Kafka Server started' "$dir/server.log" 2>/dev/null && port_open "$port"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$dir" >&2
            say "broker not ready after ${START_TIMEOUT}s; stopping it"
            stop_dir "$dir" >/dev/null 2>&1 || true
            die "timeout: broker on 127.0.0.1:$port not ready after ${START_TIMEOUT}s"
        fi
        sleep 0.2
    done
}

# the settings a cluster node keeps in its data dir (cluster.env), as variables
read_member() {
    local dir="$1"
    CLUSTER_ID="" NODE_ID="" NODES="" VOTERS="" CONTROLLER_PORT=""
    # shellcheck disable=SC1091
    source "$dir/cluster.env"
    [[ -n "$CLUSTER_ID" && "$NODE_ID" =~ ^[0-9]+$ && "$NODES" =~ ^[0-9]+$ && -n "$VOTERS" && "$CONTROLLER_PORT" =~ ^[0-9]+$ ]] \
        || die "$dir/cluster.env is damaged; stop the cluster and remove its data dirs"
}

# A new cluster on PORTS: controller ports and a cluster id, written into every node's
# dir; an existing one: check that its nodes agree with the ports asked for.
cluster_init() {
    local ports=("$@") n=$# i port dir cid voters="" cports=() first security
    first="$(data_dir_of "${ports[0]}")"
    security="$(security_for "$first")"
    if [[ -f "$first/cluster.env" ]]; then
        read_member "$first"
        ((NODES == n)) || die "the cluster on port ${ports[0]} has $NODES nodes, not $n (KAFKA_BROKERS=$NODES)"
        cid="$CLUSTER_ID"
        for ((i = 1; i < n; i++)); do
            dir="$(data_dir_of "${ports[i]}")"
            [[ -f "$dir/cluster.env" ]] || die "$dir is not a node of the cluster on port ${ports[0]}; remove it to re-create the cluster"
            read_member "$dir"
            [[ "$CLUSTER_ID" == "$cid" ]] || die "$dir belongs to another cluster ($CLUSTER_ID, not $cid)"
        done
        security_for "$first" >/dev/null
        return 0
    fi
    for port in "${ports[@]}"; do
        dir="$(data_dir_of "$port")"
        if [[ -f "$dir/logs/meta.properties" || -f "$dir/cluster.env" ]]; then
            die "$dir holds another broker's data; stop it and remove the dir to make a $n-node cluster there"
        fi
    done
    cid="$(new_cluster_id)"
    for ((i = 0; i < n; i++)); do
        cports+=("$(free_port_except "${ports[@]}" "${cports[@]}")")
        voters+="${voters:+,}$((i + 1))@127.0.0.1:${cports[i]}"
    done
    for ((i = 0; i < n; i++)); do
        dir="$(data_dir_of "${ports[i]}")"
        mkdir -p "$dir/logs"
        printf 'CLUSTER_ID=%s\nNODE_ID=%d\nNODES=%d\nVOTERS=%s\nCONTROLLER_PORT=%d\n' \
            "$cid" $((i + 1)) "$n" "$voters" "${cports[i]}" >"$dir/cluster.env"
        echo "$security" >"$dir/security"
        if [[ "$security" == sasl_ssl ]]; then
            if ((i == 0)); then secure_material "$dir"; else share_material "$first" "$dir"; fi
        fi
    done
}

# prepare_single DIR PORT: config + storage of a single node (controller port kept if free)
prepare_single() {
    local dir="$1" port="$2" cport="" security
    if [[ -f "$dir/controller.port" ]]; then
        cport="$(cat "$dir/controller.port")"
        if ! [[ "$cport" =~ ^[0-9]+$ ]] || [[ "$cport" == "$port" ]] || port_open "$cport"; then cport=""; fi
    fi
    if [[ -z "$cport" ]] && [[ -n "${KAFKA_CONTROLLER_PORT:-}" ]]; then
        cport="$KAFKA_CONTROLLER_PORT"
    fi
    [[ -n "$cport" && "$cport" != "$port" ]] || cport="$(free_port_except "$port")"
    echo "$cport" >"$dir/controller.port"
    security="$(security_for "$dir")"
    echo "$security" >"$dir/security"
    [[ "$security" == sasl_ssl ]] && secure_material "$dir"
    write_config "$dir" "$port" "$cport" 1 "1@127.0.0.1:$cport" 1 "$security"
    if [[ -f "$dir/server.log" ]]; then mv -f "$dir/server.log" "$dir/server.log.prev"; fi
    format_storage "$dir"
}

# prepare_member DIR PORT: config + storage of a cluster node, from its cluster.env
prepare_member() {
    local dir="$1" port="$2"
    read_member "$dir"
    port_open "$CONTROLLER_PORT" \
        && die "controller port 127.0.0.1:$CONTROLLER_PORT of node $NODE_ID ($dir) is in use by another process"
    write_config "$dir" "$port" "$CONTROLLER_PORT" "$NODE_ID" "$VOTERS" "$NODES" "$(security_of "$dir")"
    if [[ -f "$dir/server.log" ]]; then mv -f "$dir/server.log" "$dir/server.log.prev"; fi
    format_storage "$dir" "$CLUSTER_ID"
}

# launch DIR: run a prepared node's JVM in the background (kafka.pid, watchdog)
launch() {
    local dir="$1" pid
    # shellcheck disable=SC2086
    nohup "$JAVA" $HEAP $JVM_OPTS -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
        </dev/null >"$dir/kafka.out" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"
    # $! is the forked shell until it has exec'd java: until then its command line is this
    # script's, and broker_pid (which checks it) would call a starting node "not running".
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -n "$(broker_pid "$dir")" ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    start_watchdog "$dir" "$pid"
}

# the data dirs of the nodes this start launched: stopped again if the start fails
LAUNCHED=()
START_OK=0
stop_launched() {
    if ((START_OK == 0 && ${#LAUNCHED[@]} > 0)); then
        say "start failed: stopping the nodes it started"
        stop_dirs "${LAUNCHED[@]}" || true
    fi
}

cmd_start() {
    local t0="${EPOCHREALTIME/[.,]/}" ports=() port dir pid down=() bootstrap=""
    resolve "${1:-}"
    mapfile -t ports < <(ports_of)
    command -v "$JAVA" >/dev/null || die "java not found (need Java 17+; set JAVA_HOME)"
    if ((${#ports[@]} > 1)); then cluster_init "${ports[@]}"; fi
    # Check every node that is down before launching any: a start that cannot finish starts nothing.
    for port in "${ports[@]}"; do
        dir="$(data_dir_of "$port")"
        bootstrap+="${bootstrap:+,}127.0.0.1:$port"
        [[ -n "$(broker_pid "$dir")" ]] && continue
        port_open "$port" && die "127.0.0.1:$port is already in use by another process"
        if [[ -f "$dir/cluster.env" ]]; then
            read_member "$dir"
            port_open "$CONTROLLER_PORT" \
                && die "controller port 127.0.0.1:$CONTROLLER_PORT of node $NODE_ID ($dir) is in use by another process"
        fi
        down+=("$port")
    done
    ((${#down[@]} == 0)) || cmd_fetch
    trap stop_launched EXIT
    for port in "${down[@]}"; do
        dir="$(data_dir_of "$port")"
        mkdir -p "$dir/logs"
        if [[ -f "$dir/cluster.env" ]]; then prepare_member "$dir" "$port"; else prepare_single "$dir" "$port"; fi
        launch "$dir"
        LAUNCHED+=("$dir")
    done
    for port in "${ports[@]}"; do
        dir="$(data_dir_of "$port")"
        pid="$(broker_pid "$dir")"
        [[ -n "$pid" ]] || die "the node on 127.0.0.1:$port is not running"
        wait_ready "$dir" "$port" "$pid"
    done
    dir="$(data_dir_of "${ports[0]}")"
    if [[ "$(security_of "$dir")" == sasl_ssl ]]; then grant_app "$dir"; fi
    START_OK=1
    local ms=$(((${EPOCHREALTIME/[.,]/} - t0) / 1000))
    if ((${#down[@]} == 0)); then
        say "already running: bootstrap $bootstrap, data $(data_dir_of "${ports[0]}")"
    else
        say "started ${down[*]} in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s: bootstrap $bootstrap, data $(data_dir_of "${ports[0]}")"
    fi
    echo "$bootstrap"
}

# ---------------------------------------------------------------- stop / status

# stop_dirs DIR...: SIGTERM to every node at once (a cluster's last node would
# otherwise wait for a quorum that left), then wait; SIGKILL after STOP_TIMEOUT
stop_dirs() {
    local dir pid wpid i pids=() alive
    for dir in "$@"; do
        if [[ -f "$dir/watchdog.pid" ]]; then
            wpid="$(cat "$dir/watchdog.pid" 2>/dev/null || true)"
            if [[ "$wpid" =~ ^[0-9]+$ ]]; then kill "$wpid" 2>/dev/null || true; fi
            rm -f "$dir/watchdog.pid"
        fi
        pid="$(broker_pid "$dir")"
        if [[ -z "$pid" ]]; then
            rm -f "$dir/kafka.pid"
            say "not running (data $dir)"
            continue
        fi
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid:$dir")
    done
    # alive = broker_pid still finds it (its command line: a zombie or a reused pid is gone)
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        alive=0
        for entry in "${pids[@]}"; do [[ -n "$(broker_pid "${entry#*:}")" ]] && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for entry in "${pids[@]}"; do
        pid="${entry%%:*}" dir="${entry#*:}"
        if [[ -n "$(broker_pid "$dir")" ]]; then
            say "pid $pid still alive after ${STOP_TIMEOUT}s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do [[ -n "$(broker_pid "$dir")" ]] || break; sleep 0.1; done
        fi
        rm -f "$dir/kafka.pid"
        say "stopped pid $pid (data $dir)"
    done
}

stop_dir() { stop_dirs "$1"; }

cmd_stop() {
    local ports=() dirs=() port
    resolve "${1:-}"
    mapfile -t ports < <(ports_of)
    for port in "${ports[@]}"; do dirs+=("$(data_dir_of "$port")"); done
    stop_dirs "${dirs[@]}"
}

cmd_status() {
    local ports=() port dir pid code=0
    resolve "${1:-}"
    mapfile -t ports < <(ports_of)
    for port in "${ports[@]}"; do
        dir="$(data_dir_of "$port")"
        pid="$(broker_pid "$dir")"
        if [[ -n "$pid" ]] && port_open "$port"; then
            echo "running: pid $pid, bootstrap 127.0.0.1:$port, data $dir"
        elif [[ -n "$pid" ]]; then
            echo "starting (port not open yet): pid $pid, data $dir"
            code=3
        else
            echo "stopped: 127.0.0.1:$port (data $dir)"
            code=3
        fi
    done
    return $code
}

cmd_logs() {
    local ports=() port
    resolve "${1:-}"
    mapfile -t ports < <(ports_of)
    for port in "${ports[@]}"; do
        log_tail "$(data_dir_of "$port")" "${QTASKS_KAFKA_LOG_LINES:-60}"
    done
}

# the settings each node gets, as a start writes them (controller ports and data dirs are examples)
cmd_config() {
    local ports=() i voters="" tmp
    resolve "${1:-}"
    mapfile -t ports < <(ports_of)
    for ((i = 0; i < NODES_N; i++)); do voters+="${voters:+,}$((i + 1))@127.0.0.1:$((PORT0 + NODES_N + i))"; done
    tmp="$(mktemp -d)"
    for ((i = 0; i < NODES_N; i++)); do
        write_config "$tmp" "${ports[i]}" $((PORT0 + NODES_N + i)) $((i + 1)) "$voters" "$NODES_N" \
            "$(security_for "$(data_dir_of "${ports[i]}")")"
        sed "s|$tmp|$(data_dir_of "${ports[i]}")|g" "$tmp/server.properties"
    done
    rm -rf "$tmp"
}

# the app user's settings for a secure cluster, as QTASKS_* lines (source them, or read the files)
cmd_env() {
    local dir
    resolve "${1:-}"
    dir="$(data_dir_of "$PORT0")"
    [[ "$(security_of "$dir")" == sasl_ssl ]] || die "the broker on port $PORT0 is not in secure mode (KAFKA_SECURITY=sasl_ssl)"
    cat <<EOF
QTASKS_BROKER_URL=kafka://$(ports_of | sed 's/^/127.0.0.1:/' | paste -sd,)
QTASKS_KAFKA_SECURITY_PROTOCOL=SASL_SSL
QTASKS_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
QTASKS_KAFKA_SASL_USERNAME=qtasks
QTASKS_KAFKA_SASL_PASSWORD_FILE=$dir/secure/qtasks.password
QTASKS_KAFKA_SSL_CAFILE=$dir/secure/ca.crt
EOF
}

# Kafka's AclCommand as the admin user of a secure cluster: kafka.sh acl [PORT] -- ARGS...
cmd_acl() {
    local port=""
    [[ $# -gt 0 && "$1" != -- ]] && { port="$1"; shift; }
    [[ "${1:-}" == -- ]] && shift
    resolve "$port"
    acl_command "$(data_dir_of "$PORT0")" "$@"
}

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        fetch) cmd_fetch ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        logs) cmd_logs "$@" ;;
        config) cmd_config "$@" ;;
        env) cmd_env "$@" ;;
        acl) cmd_acl "$@" ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
