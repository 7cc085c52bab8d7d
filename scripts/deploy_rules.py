#!/usr/bin/env python3
"""The rules deploy/ must keep that no schema knows: the scaler, the grace periods and the
settings agree with each other and with the worker. Run by scripts/check-deploy."""
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def docs(path):
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def seconds(text):
    """A compose duration (`30s`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    check(parts and "".join(n + u for n, u in parts) == text, f"unreadable duration {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# The settings the worker knows, from the generated docs/configuration.md.
known = set(re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / "docs/configuration.md").read_text(), re.M))
check(len(known) > 20, "docs/configuration.md lists the settings")

k8s = {(d["kind"], d["metadata"]["name"]): d for f in ["settings.yaml", "worker.yaml", "scaler.yaml"]
       for d in docs(f"deploy/k8s/{f}")}
settings = k8s[("ConfigMap", "free-roam-settings")]["data"]
secret = k8s[("Secret", "free-roam-redis")]
for name in list(settings) + list(secret.get("stringData", {})):
    check(name in known, f"k8s: {name} is not a worker setting")
capacity = int(settings["MAX_CONCURRENT_STREAMS"])
shutdown_s = int(settings["SHUTDOWN_TIMEOUT_MS"]) / 1000
prefix = settings.get("KEY_PREFIX", "fr")

deployment = k8s[("Deployment", "free-roam-worker")]
pod = deployment["spec"]["template"]["spec"]
check(pod["terminationGracePeriodSeconds"] > shutdown_s,
      "k8s: terminationGracePeriodSeconds must exceed SHUTDOWN_TIMEOUT_MS")
[worker] = pod["containers"]
refs = {next(iter(r)): r[next(iter(r))]["name"] for r in worker["envFrom"]}
check(refs == {"configMapRef": "free-roam-settings", "secretRef": "free-roam-redis"},
      f"k8s: the worker takes its settings from the ConfigMap and the Secret: {refs}")
check(worker["readinessProbe"]["httpGet"]["path"] == "/health/ready", "k8s: readiness on /health/ready")
check(worker["livenessProbe"]["httpGet"]["path"] == "/health/live", "k8s: liveness on /health/live")
check("cpu" in worker["resources"]["requests"] and "memory" in worker["resources"]["requests"],
      "k8s: CPU and memory requests")
health_port = int(settings["HEALTH_ADDR"].rsplit(":", 1)[1])
check([p["containerPort"] for p in worker["ports"]] == [health_port], "k8s: the port is HEALTH_ADDR's")

scaled = k8s[("ScaledObject", "free-roam-worker")]
check(scaled["spec"]["scaleTargetRef"]["name"] == "free-roam-worker", "keda: scales the worker Deployment")
[trigger] = scaled["spec"]["triggers"]
meta = trigger["metadata"]
check(trigger["type"] == "redis-streams", "keda: a redis-streams trigger")
check(meta.get("stream") == f"{{{prefix}}}:jobs", "keda: the stream is {KEY_PREFIX}:jobs")
# With a consumerGroup KEDA scales on pending entries or lag, which fall to 0 under
# running jobs; without one it scales on XLEN.
for wrong in ["consumerGroup", "lagCount", "pendingEntriesCount"]:
    check(wrong not in meta, f"keda: {wrong} would scale on the wrong signal")
check(int(meta.get("streamLength", 0)) == capacity, "keda: streamLength is MAX_CONCURRENT_STREAMS")
check(trigger["authenticationRef"]["name"] in {n for (k, n) in k8s if k == "TriggerAuthentication"},
      "keda: the trigger's TriggerAuthentication exists")
down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
check(down["stabilizationWindowSeconds"] >= 60, "keda: a scale-down stabilisation window of a minute or more")
check(scaled["spec"]["minReplicaCount"] >= 1, "keda: streamLength cannot wake a fleet from 0")

compose = docs("deploy/compose.yaml")[0]
cworker = compose["services"]["worker"]
check("ports" not in cworker and "container_name" not in cworker,
      "compose: the worker publishes no port and has no fixed name, so --scale works")
check(seconds(cworker["stop_grace_period"]) > int(cworker["environment"]["SHUTDOWN_TIMEOUT_MS"]) / 1000,
      "compose: stop_grace_period must exceed SHUTDOWN_TIMEOUT_MS")
for name in cworker["environment"]:
    check(name in known, f"compose: {name} is not a worker setting")

unit = (ROOT / "deploy/systemd/free-roam-worker.service").read_text()
stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
default_shutdown = re.search(r"^\| `SHUTDOWN_TIMEOUT_MS` \| `(\d+)`", (ROOT / "docs/configuration.md").read_text(), re.M)
check(stop > int(default_shutdown.group(1)) / 1000, "systemd: TimeoutStopSec must exceed SHUTDOWN_TIMEOUT_MS")

dockerfile = (ROOT / "deploy/Dockerfile").read_text()
check(f"127.0.0.1:{health_port}/health/live" in dockerfile, "Dockerfile: HEALTHCHECK probes /health/live on HEALTH_ADDR's port")
check(re.search(r"^USER (?!0|root)", dockerfile, re.M) is not None, "Dockerfile: runs as a non-root user")
# The image builds the way a bare machine does, so the script's checks cover it.
check(re.search(r"^RUN .*scripts/build$", dockerfile, re.M) is not None,
      "Dockerfile: the build stage runs scripts/build")
check(re.search(r"^FROM .* AS build$", dockerfile, re.M) and dockerfile.count("\nFROM ") >= 1,
      "Dockerfile: multi-stage")

dashboard = json.loads((ROOT / "deploy/grafana/free-roam.json").read_text())
check(dashboard.get("panels"), "grafana: the dashboard has panels")

if problems:
    print("\n".join(f"deploy: {p}" for p in problems))
    sys.exit(1)
print("deploy rules: ok")
