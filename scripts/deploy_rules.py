#!/usr/bin/env python3
"""The rules deploy/ must keep that no schema knows: the scalers, the grace periods and the
settings agree with each other and with the worker, and the model's volume, the memory
limit and the image agree with docs/operations.md. Run by scripts/check-deploy."""
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

k8s = {(d["kind"], d["metadata"]["name"]): d for f in ["settings.yaml", "models.yaml", "worker.yaml", "scaler.yaml"]
       for d in docs(f"deploy/k8s/{f}")}
cluster_k8s = {(d["kind"], d["metadata"]["name"]): d for d in docs("deploy/k8s/redis-cluster/scaler.yaml")}
loader = docs("deploy/k8s/tools/model-loader.yaml")[0]
operations = (ROOT / "docs/operations.md").read_text()
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
# /health/live answers while the model still loads: only /health/ready says it is loaded.
check(worker["startupProbe"]["httpGet"]["path"] == "/health/ready", "k8s: the start-up probe waits for /health/ready")
check("cpu" in worker["resources"]["requests"] and "memory" in worker["resources"]["requests"],
      "k8s: CPU and memory requests")
health_port = int(settings["HEALTH_ADDR"].rsplit(":", 1)[1])
check([p["containerPort"] for p in worker["ports"]] == [health_port], "k8s: the port is HEALTH_ADDR's")

# The model: MODEL_PATH is on the volume of the claim models.yaml creates.
claims = {n for (k, n) in k8s if k == "PersistentVolumeClaim"}
volumes = {v["name"]: v for v in pod["volumes"]}
model_mounts = [m for m in worker["volumeMounts"]
                if settings["MODEL_PATH"].startswith(m["mountPath"].rstrip("/") + "/")]
check(len(model_mounts) == 1, "k8s: MODEL_PATH is a folder on a mounted volume")
for m in model_mounts:
    claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
    check(claim in claims, f"k8s: the models volume's claim {claim} is created by models.yaml")
    check(m.get("readOnly") is True, "k8s: workers mount the models volume read-only")
    loader_claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in loader["spec"]["volumes"]}
    check(claim in loader_claims, "k8s: tools/model-loader.yaml mounts the workers' models claim")


def mebibytes(quantity):
    """A Kubernetes memory quantity in Mi or Gi, in MiB."""
    units = {"Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    check(m is not None, f"unreadable memory quantity {quantity!r}")
    return int(m.group(1)) * units[m.group(2)] if m else 0


# Memory: the limit covers MODEL_TYPE's row of docs/operations.md ("Memory per model").
memory_rows = dict(re.findall(r"^\| `([a-z-]+)` \|.*\| (\d+(?:Mi|Gi)) \|$", operations, re.M))
check(len(memory_rows) >= 5, "docs/operations.md: a memory row per model")
check(settings["MODEL_TYPE"] in memory_rows, "docs/operations.md: a memory row for the ConfigMap's MODEL_TYPE")
limit = mebibytes(worker["resources"]["limits"]["memory"])
check(limit >= mebibytes(memory_rows.get(settings["MODEL_TYPE"], "0Mi")),
      "k8s: the memory limit covers MODEL_TYPE's row in docs/operations.md")
check(limit >= max(map(mebibytes, (v for k, v in memory_rows.items() if k != "paligemma")), default=0),
      "k8s: the default memory limit fits every CPU model's row in docs/operations.md")
check(mebibytes(worker["resources"]["requests"]["memory"]) <= limit, "k8s: the memory request is within the limit")

# The image: one name, pinned to the release, built and pushed as docs/operations.md says.
image = worker["image"]
version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
check(image.rsplit(":", 1)[-1] == version, f"k8s: the image tag is the release version {version}: {image}")
check(loader["spec"]["containers"][0]["image"] == image, "k8s: the model loader runs the worker's image")
for step in ["docker build -f deploy/Dockerfile -t " + image, "docker push " + image]:
    check(step in operations, f"docs/operations.md: `{step}`")

def check_trigger(objects, kind, address_from_env, where):
    """One scaler file's trigger: XLEN of the jobs stream over MAX_CONCURRENT_STREAMS, the
    Redis address read from the worker's own settings (`address_from_env`: trigger
    parameter -> setting), never written in the trigger."""
    scaled = objects[("ScaledObject", "free-roam-worker")]
    check(scaled["spec"]["scaleTargetRef"]["name"] == "free-roam-worker", f"{where}: scales the worker Deployment")
    [trigger] = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    check(trigger["type"] == kind, f"{where}: a {kind} trigger")
    check(meta.get("stream") == f"{{{prefix}}}:jobs", f"{where}: the stream is {{KEY_PREFIX}}:jobs")
    # With a consumerGroup KEDA scales on pending entries or lag, which fall to 0 under
    # running jobs; without one it scales on XLEN.
    for wrong in ["consumerGroup", "lagCount", "pendingEntriesCount"]:
        check(wrong not in meta, f"{where}: {wrong} would scale on the wrong signal")
    check(int(meta.get("streamLength", 0)) == capacity, f"{where}: streamLength is MAX_CONCURRENT_STREAMS")
    check(trigger["authenticationRef"]["name"] in {n for (k, n) in objects if k == "TriggerAuthentication"},
          f"{where}: the trigger's TriggerAuthentication is in the same file")
    for written in ["address", "host", "port", "addresses", "hosts", "ports"]:
        check(written not in meta, f"{where}: `{written}` writes the Redis address a second time")
    for parameter, setting in address_from_env.items():
        check(meta.get(parameter) == setting, f"{where}: {parameter} is {setting}")
        check(setting in known, f"{where}: {setting} is a worker setting")
    return scaled


scaled = check_trigger(k8s, "redis-streams", {"hostFromEnv": "REDIS_HOST", "portFromEnv": "REDIS_PORT"}, "keda")
# The trigger reads REDIS_HOST and REDIS_PORT; the workers use them only without these.
for name in ["REDIS_HOST", "REDIS_PORT"]:
    check(name in settings, f"k8s: the ConfigMap sets {name}, which the trigger reads")
for name in ["REDIS_URL", "REDIS_CLUSTER_NODES"]:
    check(name not in settings and name not in secret.get("stringData", {}),
          f"k8s: {name} would send the workers elsewhere than the trigger")
cluster_scaled = check_trigger(cluster_k8s, "redis-cluster-streams", {"addressesFromEnv": "REDIS_CLUSTER_NODES"},
                               "keda (redis-cluster)")
def without_triggers(scaled_object):
    return {**scaled_object["spec"], "triggers": None}


check(without_triggers(cluster_scaled) == without_triggers(scaled),
      "keda (redis-cluster): the same scaling as scaler.yaml but for the trigger")
check(cluster_k8s[("TriggerAuthentication", "free-roam-redis")] == k8s[("TriggerAuthentication", "free-roam-redis")],
      "keda (redis-cluster): the same TriggerAuthentication as scaler.yaml")
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
