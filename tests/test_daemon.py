"""The watchdog daemon as systemd runs it: a real subprocess, real stage processes, real faults.

Every fault is injected into a process the daemon started for this test (found through the
daemon's snapshot), and every test checks the alert JSON lines the daemon logged.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from heygem import assets
from tests.daemon_helpers import Daemon, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {
        "template": assets.make_template_video(root / "template.mp4", seconds=2.0),
        "audio": assets.make_speech_audio(root / "speech.wav", seconds=1.0),
        "long": assets.make_speech_audio(root / "long.wav", seconds=8.0, seed=2),
    }


@pytest.fixture
def start(tmp_path):
    started: list[Daemon] = []

    def _start(config: str = "", **kw) -> Daemon:
        d = Daemon(tmp_path, config, **kw)
        started.append(d)
        return d

    yield _start
    for d in started:
        left = d.stop_and_clear()
        assert not left, f"daemon left processes behind: {left}"


def submit(d: Daemon, audio, video, code: str) -> dict:
    status, body = d.http("/easy/submit", {"audio_url": str(audio), "video_url": str(video), "code": code})
    assert status == 200 and body["code"] == 10000, body
    return body


def query(d: Daemon, code: str) -> dict:
    return d.http(f"/easy/query?code={code}")[1]


def until_done(d: Daemon, code: str, timeout_s: float = 90) -> dict:
    """Poll like the official client (it polls every 2 s; faster here)."""
    return wait_for(lambda: (q := query(d, code))["data"]["status"] in (2, 3) and q, timeout_s, every_s=0.5)


def test_ready_watchdog_status_and_clean_stop(start, media):
    d = start(watchdog_usec=1_000_000)
    assert d.wait_notify("READY=1"), d.log_path.read_text()[-3000:]
    d.read_notify()
    pings = [t for t, m in d.listen(3.0) if m == "WATCHDOG=1"]
    assert len(pings) >= 4, d.messages  # every 0.5 s: half of WATCHDOG_USEC
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 1.0, gaps  # never as slow as the deadline itself
    assert any(m.startswith("STATUS=ready") for m in d.read_notify())
    status, ready = d.http("/readyz")
    assert status == 200
    assert d.http("/healthz")[0] == 200
    workers = d.descendants()
    assert len([p for p in workers if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]) >= 3
    assert d.stop() == 0
    assert "STOPPING=1" in d.read_notify()
    assert not (d.state / "daemon.json").exists()
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_official_client_flow_and_metrics(start, media):
    d = start()
    assert d.wait_notify("READY=1")
    submit(d, media["audio"], media["template"], "client-1")
    seen = []
    done = wait_for(lambda: (q := query(d, "client-1")) and (seen.append(q["data"]["progress"]) or q["data"]["status"] == 2) and q, 90, 0.3)
    assert done, seen
    assert done["data"]["progress"] == 100 and Path(done["data"]["result"]).exists()
    assert seen == sorted(seen), "progress never goes backwards"

    def scrape():
        status, text = d.http("/metrics")
        assert status == 200
        return {f.name: f for f in text_string_to_metric_families(text)}

    # /metrics shows the last tick's view: wait for the tick after the job ended
    families = wait_for(lambda: (f := scrape()) and {s.labels["state"]: s.value for s in f["heygem_jobs"].samples}["succeeded"] == 1 and f, 10)
    assert families, scrape()
    assert "heygem_stage_items_processed" in families
    assert query(d, "nope")["code"] == 10004


def test_killed_worker_is_restarted_and_its_job_completes(start, media):
    d = start("[actions]\nbackoff_initial_s = 0.2\n")
    assert d.wait_notify("READY=1")
    submit(d, media["long"], media["template"], "kill-1")
    assert wait_for(lambda: query(d, "kill-1")["data"]["progress"] > 20, 60)
    victim = d.stage_pid("generate")
    os.kill(victim, signal.SIGKILL)  # a stage process the daemon started for this test
    done = until_done(d, "kill-1")
    assert done and done["data"]["status"] == 2, done
    fired = d.alerts("worker_dead")
    assert fired and "replica 0" in fired[0]["action"], fired  # restarted, or scheduled after back-off
    assert fired[0]["evidence"]["exit_code"] == -signal.SIGKILL
    assert d.alerts("worker_dead", "resolved")
    requeued = [r for r in d.records() if r.get("event") == "replica_stopped"]
    assert requeued and requeued[0]["requeued"], requeued
    assert [r for r in d.records() if r.get("event") == "replica_restarted"]


def test_stopped_worker_is_found_hung_and_restarted(start, media):
    d = start("[rules]\nheartbeat_timeout_s = 2.0\n[actions]\nbackoff_initial_s = 0.2\nterm_grace_s = 1.0\n")
    assert d.wait_notify("READY=1")
    victim = d.stage_pid("encode")
    stopped_at = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    fired = wait_for(lambda: d.alerts("worker_hung"), 30)
    latency = time.monotonic() - stopped_at
    assert fired, d.log_path.read_text()[-3000:]
    assert latency < 2.0 + 0.5 + 5.0, latency  # timeout + one tick + generous slack
    assert "replica 0" in fired[0]["action"]
    assert wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE, 15)
    submit(d, media["audio"], media["template"], "after-hang")
    assert until_done(d, "after-hang")["data"]["status"] == 2


def test_forced_cpu_fallback_is_flagged_before_the_first_job(start, media):
    d = start('[pipeline]\ndevices = [0]\nfallback = "fail"\n')
    fired = wait_for(lambda: d.alerts("cpu_fallback") or d.records() and [r for r in d.records() if r.get("event") == "replica_out_of_service"], 60)
    assert fired, d.log_path.read_text()[-3000:]
    status, body = d.http("/readyz")
    assert status == 503 and "replica-0" in str(body)
    fatal = [r for r in d.records() if r.get("event") == "stage_fatal"]
    assert fatal and ".so" in fatal[0]["reason"], fatal  # ONNX Runtime's own words: the missing library
    assert "READY=1" not in d.read_notify()


def test_cpu_fallback_warn_alerts_and_keeps_serving(start, media):
    d = start('[pipeline]\ndevices = [0]\nfallback = "warn"\n')
    fired = wait_for(lambda: d.alerts("cpu_fallback"), 60)
    assert fired, d.log_path.read_text()[-3000:]
    assert "CUDAExecutionProvider" in fired[0]["evidence"]["missing"]
    submit(d, media["audio"], media["template"], "warn-1")
    assert until_done(d, "warn-1")["data"]["status"] == 2


def test_gpu_idle_with_full_queue_is_the_incident_signature(start, media, tmp_path):
    from tests.fakenvml import FakeGpu, build_library, fake_env, write_values

    lib = build_library(tmp_path / "nvml")
    values = tmp_path / "gpus.txt"
    write_values(values, [FakeGpu(util_pct=0, mem_used_mib=45000, uuid=f"GPU-{i}") for i in range(8)])
    # fallback = "fail" takes the only replica out of service: jobs stay queued, the GPU idles.
    d = start('[pipeline]\ndevices = [0]\nfallback = "fail"\n[rules]\ngpu_idle_for_s = 1.0\n', env=fake_env(lib, values))
    assert wait_for(lambda: d.snapshot() and d.snapshot()["gpus"], 60)
    submit(d, media["audio"], media["template"], "stuck-1")
    fired = wait_for(lambda: d.alerts("gpu_idle_busy_queue"), 30)
    assert fired and len({a["key"] for a in fired}) == 8, fired
    assert fired[0]["evidence"]["jobs_waiting"] >= 1
    write_values(values, [FakeGpu(util_pct=95, mem_used_mib=45000, uuid=f"GPU-{i}") for i in range(8)])
    assert wait_for(lambda: len(d.alerts("gpu_idle_busy_queue", "resolved")) == 8, 30)


EXTERNAL_APP = """
import os, signal, sys, time
# Like upstream app.py: spawns children and never waits for them.
for _ in range(3):
    if os.fork() == 0:
        os._exit(0)
# A child that forks a grandchild and exits: the grandchild is re-parented to the subreaper.
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.5)
        os._exit(0)
    os._exit(0)
print("app started", flush=True)
while True:
    time.sleep(0.2)
"""


def _external(start, tmp_path, actions: str):
    app = tmp_path / "app.py"
    app.write_text(EXTERNAL_APP)
    d = start("[rules]\nzombies_for_s = 0.0\n[actions]\nzombie_parent_grace_s = 1.0\nterm_grace_s = 1.0\n"
              "backoff_initial_s = 0.2\nbackoff_max_s = 0.2\n" + actions,
              daemon_keys=f'mode = "external"\ncommand = ["{sys.executable}", "{app}"]\n')
    assert d.wait_notify("READY=1")
    first = wait_for(lambda: (s := d.snapshot()) and s["external"] and s["external"]["pid"], 30)
    fired = wait_for(lambda: d.alerts("zombies"), 30)
    assert fired and str(first) in fired[0]["evidence"]["parents"], fired
    nudged = wait_for(lambda: [r for r in d.records() if r.get("event") == "zombie_parent_nudged"], 10)
    assert nudged and nudged[0]["parent"] == first
    return d, first


def test_zombies_of_a_healthy_service_are_nudged_and_reported_not_restarted(start, tmp_path):
    """Restarting upstream only to reap its zombies kills the tasks it has in flight; 3 zombies
    do not threaten the pid space, and the service is healthy: SIGCHLD, alert, nothing more."""
    d, first = _external(start, tmp_path, "")
    kept = wait_for(lambda: [a for a in d.alerts("zombies") if "not restarted" in a.get("action", "")], 15)
    time.sleep(3.0)  # well past the 1 s grace
    assert d.snapshot()["external"]["pid"] == first
    assert not [r for r in d.records() if r.get("event") == "external_restarted"]
    assert kept or [r for r in d.records() if r.get("event") == "zombie_parent_nudged"]


def test_zombies_past_the_threshold_restart_the_parent_on_the_one_budget(start, tmp_path):
    """Every incarnation leaves 3 zombies; at `zombie_restart_at = 3` each is restarted, and the
    restarts spend the crash-loop budget like any other: 2 allowed, then crash_loop (it used to
    be restarted 13 times in 70 s without ever reaching it)."""
    d, first = _external(start, tmp_path, "zombie_restart_at = 3\ncrash_loop_restarts = 2\n")
    restarted = wait_for(lambda: [r for r in d.records() if r.get("event") == "external_restarted"], 30)
    assert restarted and "zombies" in restarted[0]["why"], d.log_path.read_text()[-3000:]
    looped = wait_for(lambda: d.alerts("crash_loop"), 60)
    assert looped and looped[0]["key"] == "external", d.log_path.read_text()[-3000:]
    assert len([r for r in d.records() if r.get("event") == "external_restarted"]) == 2
    # the grandchild is re-parented to the daemon (the subreaper): terminated as an orphan if a
    # tick sees it running, reaped if it exits first; either way it never stays a zombie
    assert wait_for(lambda: [r for r in d.records() if r.get("event") in ("reaped", "orphan_terminated")], 30)
    own = psutil.Process(d.proc.pid)
    assert wait_for(lambda: not [c for c in own.children() if c.status() == psutil.STATUS_ZOMBIE], 5)
    assert not psutil.pid_exists(first), "the old parent was stopped and reaped"
    ready = d.http("/readyz")
    assert ready[0] == 503 and "crash loop" in str(ready[1]), ready
    assert d.http("/healthz")[0] == 200  # the loop runs: healing or stopped, the daemon is healthy


def test_sighup_with_a_bad_config_keeps_the_old_one(start, media):
    d = start()
    assert d.wait_notify("READY=1")
    good = d.config.read_text()
    d.config.write_text(good + "[daemon.bogus]\n")
    d.proc.send_signal(signal.SIGHUP)
    failed = wait_for(lambda: [r for r in d.records() if r.get("event") == "config_reload_failed"], 15)
    assert failed and "bogus" in failed[0]["error"]
    submit(d, media["audio"], media["template"], "after-hup")
    assert until_done(d, "after-hup")["data"]["status"] == 2


def test_external_mode_knows_upstreams_queue_full_line_without_configured_patterns(start, tmp_path):
    """Upstream writes its queue-full line after its own 60 s wait: with no pattern configured the
    daemon raises queue_full within 2 ticks of the line, not after another queue_full_for_s."""
    app, log = tmp_path / "app.py", tmp_path / "dh.log"
    app.write_text("import time\nwhile True:\n    time.sleep(0.2)\n")
    log.write_text("[2025-03-18 12:52:07,646] [run.py[line:147]] [INFO] [[1002] -> 预处理耗时:0.359s]\n", encoding="utf-8")
    d = start("", daemon_keys=f'mode = "external"\ncommand = ["{sys.executable}", "{app}"]\nlog_file = "{log}"\n')
    assert d.wait_notify("READY=1")
    with open(log, "a", encoding="utf-8") as f:
        f.write("[2025-03-18 12:53:08,001] [process.py[line:110]] [ERROR] [[1002]任务视频驱动队列满，严重阻塞，下游队列异常]\n")
    written = time.monotonic()
    fired = wait_for(lambda: d.alerts("queue_full"), 10, every_s=0.05)
    took = time.monotonic() - written
    assert fired and "队列满" in fired[0]["evidence"]["line"], d.log_path.read_text()[-3000:]
    assert took <= 2 * 0.5 + 0.5, took  # two ticks of 0.5 s, and the poll's slack


def reloaded(d: Daemon, config: str) -> dict:
    """Write `config`, SIGHUP, and return the daemon's config_reloaded record."""
    seen = len([r for r in d.records() if r.get("event") == "config_reloaded"])
    d.config.write_text(config)
    d.proc.send_signal(signal.SIGHUP)
    done = wait_for(lambda: [r for r in d.records() if r.get("event") in ("config_reloaded", "config_reload_failed")][seen:], 15)
    assert done and done[0]["event"] == "config_reloaded", d.log_path.read_text()[-3000:]
    return done[0]


def test_sighup_applies_new_input_roots_to_the_api_without_restarting_replicas(start, media, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    d = start(input_roots=(elsewhere,))
    assert d.wait_notify("READY=1")
    status, body = d.http("/easy/submit", {"audio_url": str(media["audio"]), "video_url": str(media["template"]),
                                           "code": "before"})
    assert status == 200 and body["code"] != 10000, body  # outside every root: refused
    record = reloaded(d, d.config.read_text().replace(json.dumps([str(elsewhere)]),
                                                      json.dumps([str(elsewhere), str(media["audio"].parent)])))
    assert record["service_restarted"] is False
    submit(d, media["audio"], media["template"], "after")
    assert until_done(d, "after")["data"]["status"] == 2


def test_sighup_moves_the_log_watch_to_a_new_log_file_and_leaves_upstream_running(start, tmp_path):
    app, first, second = tmp_path / "app.py", tmp_path / "dh.log", tmp_path / "dh2.log"
    app.write_text("import time\nwhile True:\n    time.sleep(0.2)\n")
    first.write_text("")
    second.write_text("")
    d = start("", daemon_keys=f'mode = "external"\ncommand = ["{sys.executable}", "{app}"]\nlog_file = "{first}"\n')
    assert d.wait_notify("READY=1")
    upstream = [c.pid for c in psutil.Process(d.proc.pid).children() if str(app) in " ".join(c.cmdline())]
    record = reloaded(d, d.config.read_text().replace(f'log_file = "{first}"', f'log_file = "{second}"'))
    assert record["service_restarted"] is False
    with open(second, "a", encoding="utf-8") as f:
        f.write("[2025-03-18 12:53:08,001] [process.py[line:110]] [ERROR] [[1002]任务视频驱动队列满，严重阻塞，下游队列异常]\n")
    fired = wait_for(lambda: d.alerts("queue_full"), 10, every_s=0.05)
    assert fired and fired[0]["evidence"]["file"] == str(second), d.log_path.read_text()[-3000:]
    assert upstream and [c.pid for c in psutil.Process(d.proc.pid).children() if str(app) in " ".join(c.cmdline())] == upstream
