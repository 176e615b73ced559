"""deploy/prometheus: the alerting rules for a Prometheus server that scrapes every host.

`promtool check rules` and `promtool test rules` (Debian package `prometheus`; CI installs it,
elsewhere these skip without it), and two checks of our own: every stable alert name of the
daemon has its rule, and every metric the rules read is one the daemon exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pg_helpers import need
from watchdog.alerts import ALERTS, GpuView, StageView
from watchdog.metrics import Metrics

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "heygem-ops.rules.yml"
RULE_TESTS = RULES_DIR / "heygem-ops.rules.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    need("promtool", None if found else "promtool not found (apt-get install prometheus)")
    return found


def test_promtool_checks_the_rules():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=120,
                          cwd=RULES_DIR)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_daemon_alert_has_a_rule():
    forwarded = set(re.findall(r"heygem_alert: (\w+)", RULES.read_text()))
    assert forwarded == set(ALERTS), f"rules missing for {set(ALERTS) - forwarded}, unknown {forwarded - set(ALERTS)}"


def test_the_rules_read_only_metrics_the_daemon_exports():
    m = Metrics("0.1.0", "embedded", host="gpu-01", store="postgresql")
    m.update_from(gpus=[GpuView(0, 10.0, 100.0)], stages=[StageView(0, "decode", 3, 2, 0.0, 0.0, 1, 4, gpu=0)],
                  jobs={"queued": 1}, zombies=0, restarts={"replica-0": 0}, units={"replica-0": "running"}, firing=[])
    m.update_store(True, 12.0, 1)
    exported = {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert all('host="gpu-01"' in line for line in m.render().decode().splitlines() if line and not line.startswith("#"))
    exprs = "\n".join(re.findall(r"expr: (.+(?:\n {10}.+)*)", RULES.read_text()))
    used = set(re.findall(r"\b(heygem_[a-z_]+)\b", exprs))
    assert used and used <= exported, f"the rules read metrics the daemon does not export: {used - exported}"
