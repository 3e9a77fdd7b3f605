"""Names vulture (make lint) cannot see used: called by a framework, or data read by people.

Functions here are called by asyncio (protocol callbacks), httptools (parser callbacks),
http.server (request handlers), atexit, or are typing seams. Attributes and fields are counters
and configuration kept for operators and failure reports. Anything else vulture reports is dead:
delete it, do not add it here.
"""
# ruff: noqa
_.on_header  # unused method (bench/bench_failover.py:85)
_.on_message_complete  # unused method (bench/bench_failover.py:89)
_.on_message_complete  # unused method (bench/loadgen.py:199)
end_line  # unused variable (cli/dotenv.py:45)
_.disk_errors  # unused attribute (simulations/cluster.py:110)
_.disk_errors  # unused attribute (simulations/cluster.py:240)
_.snapshots_installed  # unused attribute (simulations/cluster.py:259)
_.snapshots_taken  # unused attribute (simulations/cluster.py:318)
disk_errors  # unused variable (simulations/cluster.py:52)
snapshots_taken  # unused variable (simulations/cluster.py:53)
snapshots_installed  # unused variable (simulations/cluster.py:54)
_.connections_closed_total  # unused attribute (simulations/nemesis/proxy.py:215)
_.connections_closed_total  # unused attribute (simulations/nemesis/proxy.py:67)
StateMachine  # unused class (simulations/sim_state.py:20)
sent_ms  # unused variable (simulations/simulator.py:144)
_.sent_ms  # unused attribute (simulations/simulator.py:199)
messages_dropped  # unused variable (simulations/simulator.py:95)
do_DELETE  # unused variable (tests/test_cli_retries.py:104)
do_GET  # unused variable (tests/test_cli_retries.py:104)
do_POST  # unused variable (tests/test_cli_retries.py:104)
do_PUT  # unused variable (tests/test_cli_retries.py:104)
_.log_message  # unused method (tests/test_cli_retries.py:106)
_.daemon_threads  # unused attribute (tests/test_cli_retries.py:110)
protocol_version  # unused variable (tests/test_cli_retries.py:80)
_.close_connection  # unused attribute (tests/test_cli_retries.py:87)
_.close_connection  # unused attribute (tests/test_cli_retries.py:91)
_.timeout  # unused attribute (tests/test_idempotency.py:340)
pytestmark  # unused variable (tests/test_kv2_hvac.py:23)
_.daemon_threads  # unused attribute (tests/test_nemesis.py:60)
_.suppressed_total  # unused attribute (vaultnode/audit.py:241)
_.suppressed_total  # unused attribute (vaultnode/audit.py:255)
_.lines_written  # unused attribute (vaultnode/audit.py:289)
_.lines_written  # unused attribute (vaultnode/audit.py:392)
log_level  # unused variable (vaultnode/config.py:94)
_flush_open_logs  # unused function (vaultnode/events.py:175)
_.eof_received  # unused method (vaultnode/http_server.py:285)
_.pause_writing  # unused method (vaultnode/http_server.py:294)
_.resume_writing  # unused method (vaultnode/http_server.py:299)
_.on_message_begin  # unused method (vaultnode/http_server.py:401)
_.on_url  # unused method (vaultnode/http_server.py:414)
_.on_header  # unused method (vaultnode/http_server.py:421)
_.on_headers_complete  # unused method (vaultnode/http_server.py:437)
_.on_body  # unused method (vaultnode/http_server.py:447)
_.on_message_complete  # unused method (vaultnode/http_server.py:454)
_.fsync_seconds_total  # unused attribute (vaultnode/paxos_replicator.py:243)
_.fsync_seconds_total  # unused attribute (vaultnode/paxos_replicator.py:608)
_.binary_location  # selenium reads it (tests/test_ui_console.py:131)
_.strikes  # a counter for failure reports (simulations/aimed_faults.py)
_.strandings  # a counter for failure reports (simulations/aimed_faults.py)
_.primings  # a counter for failure reports (simulations/aimed_faults.py: reader_rejoin)
near_limit_writes  # WorkloadCounts fields are printed through vars() (simulations/simulator.py)
batch_ops  # WorkloadCounts
token_expiries  # WorkloadCounts
not_applied  # WorkloadCounts
keyless_writes  # WorkloadCounts
api_addr  # Member's API address, replicated for the daemon's members/redirects (issue 13)
