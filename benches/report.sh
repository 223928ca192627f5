#!/usr/bin/env bash
# Issue 5's report: build once, run every benchmark, print one table with
# each figure, its ratio to the floor and to twilight-gateway's typed
# consumer, the target and whether it is met.
#
#   benches/report.sh            # everything (a few minutes)
#   BENCH_EVENTS=5000 BENCH_BLAST=20000 BENCH_PEER_EVENTS=10000 benches/report.sh   # quicker
#   benches/report.sh --table-only   # the table again from the last run's results
#
# Absolute times on shared machines drift by tens of percent between runs;
# the ratios are measured within one run (the floor and the hot path are
# interleaved in one process) and are the figures to compare.
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p target
results=target/bench-results.txt
if [ "${1:-}" != "--table-only" ]; then
    echo "== building (release binary and bench executables)" >&2
    cargo build --release --quiet
    cargo bench --no-run --quiet

    : >"$results"
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    start=$(date +%s)
    run() {
        echo "== cargo bench --bench $*" >&2
        cargo bench --quiet --bench "$@" | grep '^RESULT ' >>"$results"
    }
    run hotpath
    run twilight
    run e2e -- blast replay latency memory startup
    run broker
    run failover
    run frontdoor
    run rest
    load_after=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "INFO load average before ${load_before}, after ${load_after}; benchmarks took $(($(date +%s) - start)) s" >>"$results"
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo
echo "Machine: $(nproc) cores ($cpu), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo);" \
    "$(grep '^INFO ' "$results" | cut -d' ' -f2-);" \
    "$(rustc --version | cut -d' ' -f1-2); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo

awk '
$1 == "RESULT" { R[$2] = $3 }
function has(k) { return (k in R) }
function f(x, d) { return sprintf("%." d "f", x) }
function row(fig, val, rf, rt, target, met) {
    printf "| %-54s | %14s | %8s | %9s | %-26s | %-4s |\n", fig, val, rf, rt, target, met
}
function yes(c) { return c ? "yes" : "NO" }
function cpu(fig, us, target_floor, target_tw,   rf, rt, met, t) {
    rf = floor > 0 ? f(us / floor, 2) "x" : "-"
    rt = tw > 0 ? f(us / tw, 2) "x" : "-"
    t = ""; met = "-"
    if (target_floor > 0) { t = "<= " target_floor "x floor"; met = yes(us <= target_floor * floor) }
    if (target_tw > 0) {
        t = t ", <= " target_tw "x tw"
        met = (met == "yes" && us <= target_tw * tw) ? "yes" : "NO"
    }
    row(fig, f(us, 2) " us/ev", rf, rt, t, met)
}
END {
    floor = has("floor_ns") ? R["floor_ns"] / 1000 : 0
    tw = has("peer_twilight_typed_cpu_us") ? R["peer_twilight_typed_cpu_us"] : 0
    printf "| %-54s | %14s | %8s | %9s | %-26s | %-4s |\n", "figure", "value", "/floor", "/twilight", "target", "met?"
    printf "|%s|%s|%s|%s|%s|%s|\n", "--------------------------------------------------------", "----------------", "----------", "-----------", "----------------------------", "------"
    cpu("floor: zlib inflate + op/t/s, in process", floor, 0, 0)
    if (has("floor_inflate_only_ns")) cpu("  of which inflate alone", R["floor_inflate_only_ns"] / 1000, 0, 0)
    if (has("hot_zlib_ns")) cpu("hot path in process, zlib-stream", R["hot_zlib_ns"] / 1000, 1.3, 0)
    if (has("hot_zlib_parse_ns")) cpu("  stage: inflate + Envelope::parse", R["hot_zlib_parse_ns"] / 1000, 0, 0)
    if (has("hot_zlib_append_ns")) cpu("  stage: + EventLog::append", R["hot_zlib_append_ns"] / 1000, 0, 0)
    if (has("hot_zstd_ns")) cpu("hot path in process, zstd-stream", R["hot_zstd_ns"] / 1000, 0, 0)
    if (has("hot_none_ns")) cpu("hot path in process, none", R["hot_none_ns"] / 1000, 0, 0)
    if (has("hot_zlib_allocs")) row("hot path allocs/event (floor has " f(R["floor_allocs"], 1) " too: serde_json)", f(R["hot_zlib_allocs"], 1), "-", "-", "0 in steady state", yes(R["hot_zlib_allocs"] < 0.5))
    if (has("peer_twilight_typed_cpu_us")) cpu("twilight-gateway typed events (thread CPU)", tw, 0, 0)
    if (has("peer_twilight_raw_cpu_us")) cpu("twilight-gateway raw messages (thread CPU)", R["peer_twilight_raw_cpu_us"], 0, 0)
    if (has("peer_shardwarden_shard_cpu_us")) cpu("shardwarden Shard actor, same harness (thread CPU)", R["peer_shardwarden_shard_cpu_us"], 0, 0)
    if (has("e2e_1x_cpu_us")) cpu("daemon e2e 1 shard x 100k: daemon CPU", R["e2e_1x_cpu_us"], 1.3, 0.5)
    if (has("e2e_16x_cpu_us")) cpu("daemon e2e 16 shards x 10k: daemon CPU", R["e2e_16x_cpu_us"], 1.3, 0.5)
    if (has("e2e_1x_eps")) row("e2e 1x100k events/s (simulator " f(R["e2e_1x_sim_cpu_us"], 1) " us/ev)", f(R["e2e_1x_eps"], 0) " ev/s", "-", "-", "-", "-")
    if (has("e2e_16x_eps")) row("e2e 16x10k events/s (simulator " f(R["e2e_16x_sim_cpu_us"], 1) " us/ev)", f(R["e2e_16x_eps"], 0) " ev/s", "-", "-", "-", "-")
    if (has("e2e_1x_events_per_read")) row("e2e 1x100k events per bot read (batching)", f(R["e2e_1x_events_per_read"], 0), "-", "-", "-", "-")
    if (has("e2e_16x_missed")) row("e2e 16x10k events lost to gaps (bot too slow)", f(R["e2e_16x_missed"], 0), "-", "-", "0", yes(R["e2e_16x_missed"] == 0))
    split("100 1000 2500", ns, " ")
    for (i = 1; i <= 3; i++) {
        k = "mem_per_shard_" ns[i] "_kib"
        if (has(k)) row("idle memory per shard above base, " ns[i] " shards", f(R[k], 1) " KiB", "-", "-", "<= 64 KiB", yes(R[k] <= 64))
    }
    if (has("mem_rss_1_mib")) row("  daemon base RSS (1 shard)", f(R["mem_rss_1_mib"], 1) " MiB", "-", "-", "-", "-")
    if (has("mem_rss_2500_mib")) row("  daemon RSS with 2500 shards", f(R["mem_rss_2500_mib"], 1) " MiB", "-", "-", "2500 in one process", "yes")
    if (has("e2e_16x_peak_rss_mib")) row("peak RSS, 16x10k blast (16 MiB ring)", f(R["e2e_16x_peak_rss_mib"], 1) " MiB", "-", "-", "-", "-")
    if (has("e2e_1x_peak_rss_mib")) row("peak RSS, 1x100k blast (256 MiB ring, ~110 MB held)", f(R["e2e_1x_peak_rss_mib"], 1) " MiB", "-", "-", "-", "-")
    if (has("replay_eps")) row("replay catch-up, resume_from 100k back", f(R["replay_eps"], 0) " ev/s", "-", "-", ">= 500000 ev/s", yes(R["replay_eps"] >= 500000))
    if (has("replay_cpu_us")) row("  daemon CPU per replayed event", f(R["replay_cpu_us"], 2) " us/ev", "-", "-", "-", "-")
    if (has("lat_added_p50_us")) row("latency added by daemon @10k ev/s, p50", f(R["lat_added_p50_us"], 0) " us", "-", "-", "-", "-")
    if (has("lat_added_p99_us")) row("latency added by daemon @10k ev/s, p99", f(R["lat_added_p99_us"], 0) " us", "-", "-", "<= 200 us", yes(R["lat_added_p99_us"] <= 200))
    if (has("lat_daemon_p50_us")) row("  simulator -> bot via daemon, p50 / p99", f(R["lat_daemon_p50_us"], 0) " / " f(R["lat_daemon_p99_us"], 0) " us", "-", "-", "-", "-")
    if (has("lat_direct_p50_us")) row("  simulator -> direct client, p50 / p99", f(R["lat_direct_p50_us"], 0) " / " f(R["lat_direct_p99_us"], 0) " us", "-", "-", "-", "-")
    if (has("startup_s")) row("start-up, 8 shards, max_concurrency 2 (limit 20 s)", f(R["startup_s"], 2) " s", "-", "-", "<= 1.02x limit", yes(R["startup_ratio"] <= 1.02))
    if (has("frontdoor_fanout_0_cpu_us")) row("drop-in: daemon CPU, socket bot alone / +1 / +4 clients", f(R["frontdoor_fanout_0_cpu_us"], 2) " / " f(R["frontdoor_fanout_1_cpu_us"], 2) " / " f(R["frontdoor_fanout_4_cpu_us"], 2) " us/ev", "-", "-", "-", "-")
    if (has("frontdoor_4_client_extra_cpu_us")) row("  extra CPU per event per drop-in client (4 clients)", f(R["frontdoor_4_client_extra_cpu_us"], 2) " us/ev", "-", "-", "-", "-")
    if (has("frontdoor_identify_to_last_guild_create_ms")) row("drop-in: IDENTIFY to last of 1000 GUILD_CREATEs", f(R["frontdoor_identify_to_last_guild_create_ms"], 1) " ms", "-", "-", "-", "-")
    if (has("startup_overhead_ms")) row("  beyond the 15 s floor (last bucket round)", f(R["startup_overhead_ms"], 0) " ms", "-", "-", "-", "-")
    if (has("rest_added_p50_us")) row("REST front door @1k req/s: added latency p50 / p99", f(R["rest_added_p50_us"], 0) " / " f(R["rest_added_p99_us"], 0) " us", "-", "-", "-", "-")
    if (has("rest_direct_p50_us")) row("  direct to simulator, p50 / p99", f(R["rest_direct_p50_us"], 0) " / " f(R["rest_direct_p99_us"], 0) " us", "-", "-", "-", "-")
    if (has("rest_proxied_p50_us")) row("  through the front door, p50 / p99", f(R["rest_proxied_p50_us"], 0) " / " f(R["rest_proxied_p99_us"], 0) " us", "-", "-", "-", "-")
    if (has("rest_daemon_cpu_us")) row("  daemon CPU per proxied request", f(R["rest_daemon_cpu_us"], 1) " us/req", "-", "-", "-", "-")
    if (has("rest_429_client")) row("  429s (client / simulator), errors " f(R["rest_errors"], 0), f(R["rest_429_client"], 0) " / " f(R["rest_429_upstream"], 0), "-", "-", "0", yes(R["rest_429_client"] + R["rest_429_upstream"] == 0))
    if (has("failover_seconds")) row("failover: kill -9 to all 64 shards live (lease_ttl 3 s), " f(R["failover_resumed_shards"], 0) " resumed, " f(R["failover_identifies"], 0) " identifies", f(R["failover_seconds"], 2) " s", "-", "-", "-", "-")
    if (has("broker_with_jetstream_cpu_us")) row("daemon CPU/event, socket + JetStream (socket only " f(R["broker_socket_only_cpu_us"], 2) ")", f(R["broker_with_jetstream_cpu_us"], 2) " us/ev", "-", "-", "-", "-")
    if (has("broker_jetstream_eps")) row("  events/s stored by JetStream (socket bot " f(R["broker_socket_eps"], 0) ")", f(R["broker_jetstream_eps"], 0) " ev/s", "-", "-", "-", "-")
}
' "$results"
