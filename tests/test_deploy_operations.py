"""The deployment files are set up as KubeRay's own samples and Ray's docs do it, checked offline:

- what the KubeRay 1.7 operator itself refuses beyond its CRD schema (its `validation.go`, ported below
  for the rules these files touch: deletion rules, token auth, GCS fault tolerance, feature gates);
- who can reach a head (token auth, ClusterIP, the NetworkPolicy evaluated on sample pods);
- the object store inside /dev/shm, GPU-type node selection, the RayJob freeing its GPUs, the RayService's
  upgrade strategy, autoscaling and GCS fault tolerance (k8s/rayservice-gcs-ft.patch.yaml + k8s/redis.yaml);
- Prometheus' PodMonitors and the ports they scrape;
- the `ray up` file: an explicit AMI, `apt-get update` first, a registry login, Ray's auth token.

The CRDs are read from ../shared/kuberay (tests needing them skip with a reason where it is absent)."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version
from test_deploy_manifests import (
    CLUSTER_YAML,
    CRD_OF_KIND,
    K8S,
    KUBERAY,
    RAY_MANIFESTS,
    cluster_spec,
    crd_errors,
    crd_schema,
    load,
    pod_templates,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crds() -> Path:
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (only in the developers' checkout)")
    return KUBERAY


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def quantity(text: str | int) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes these files use, or plain bytes)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    return int(match.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]


def groups(manifest: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head and every worker group."""
    spec = cluster_spec(manifest)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, what `kubectl patch --type merge` applies."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# --- what the operator refuses (KubeRay 1.7, ray-operator/controllers/ray/utils/validation.go) ---------------

DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
OFF_BY_DEFAULT_GATES = {"networkPolicy": "RayClusterNetworkPolicy", "tlsOptions": "RayClusterMTLS",
                        "historyServerOptions": "RayClusterHistoryServer"}


def cluster_rule_errors(spec: dict) -> list[str]:
    """ValidateRayClusterSpec, for the fields these manifests use, with the operator's default feature gates."""
    errors = []
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    for group in spec.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {group['groupName']} must set minReplicas and maxReplicas without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {group['groupName']} has minReplicas greater than maxReplicas")
    head = spec["headGroupSpec"]
    env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    if spec.get("gcsFaultToleranceOptions") is None and "RAY_REDIS_ADDRESS" in env:
        errors.append("RAY_REDIS_ADDRESS is set but gcsFaultToleranceOptions is not")
    if spec.get("gcsFaultToleranceOptions") is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            errors.append("cannot set redis-password in rayStartParams with gcsFaultToleranceOptions")
        errors += [f"cannot set {v} in the head with gcsFaultToleranceOptions"
                   for v in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS") if v in env]
    if (spec.get("authOptions") or {}).get("mode") == "token":
        if Version(spec.get("rayVersion", "0")) < Version("2.52.0"):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    errors += [f"spec.{field} requires the {gate} feature gate (off by default)"
               for field, gate in OFF_BY_DEFAULT_GATES.items() if spec.get(field) is not None]
    return errors


def rayjob_rule_errors(spec: dict) -> list[str]:
    """ValidateRayJobSpec: deadlines and deletionStrategy.deletionRules."""
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{field} must be positive")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    if rules and shutdown:
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling", False)
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(keys) != 1:
            errors.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus")
            continue
        if autoscaling and rule["policy"] == "DeleteWorkers":
            errors.append(f"deletionRules[{i}]: DeleteWorkers is not supported with autoscaling")
        by_policy = ttls.setdefault((keys[0], condition[keys[0]]), {})
        if rule["policy"] in by_policy:
            errors.append(f"deletionRules[{i}]: duplicate rule for {rule['policy']}")
        by_policy[rule["policy"]] = condition.get("ttlSeconds", 0)
    for (_, status), by_policy in ttls.items():
        ordered = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
        if ordered != sorted(ordered):
            errors.append(f"deletion TTLs for {status} must not decrease along {DELETION_ORDER}")
    if spec.get("rayClusterSpec"):
        errors += cluster_rule_errors(spec["rayClusterSpec"])
    return errors


def rayservice_rule_errors(spec: dict) -> list[str]:
    errors = cluster_rule_errors(spec["rayClusterConfig"])
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
        errors.append(f"upgradeStrategy.type {kind} is invalid")
    if kind == "NewClusterWithIncrementalUpgrade" and not spec["upgradeStrategy"].get("clusterUpgradeOptions"):
        errors.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
    return errors


def operator_errors(manifest: dict) -> list[str]:
    spec = manifest["spec"]
    return {"RayCluster": cluster_rule_errors, "RayJob": rayjob_rule_errors,
            "RayService": rayservice_rule_errors}[manifest["kind"]](spec)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_the_operator_accepts_the_manifest(name):
    assert operator_errors(load(name)) == []


def test_the_operator_rules_can_fail():
    job = load("rayjob.yaml")
    job["spec"]["shutdownAfterJobFinishes"] = True
    assert "shutdownAfterJobFinishes and deletionRules are mutually exclusive" in operator_errors(job)
    job = load("rayjob.yaml")
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = True
    assert any("DeleteWorkers is not supported with autoscaling" in e for e in operator_errors(job))
    job = load("rayjob.yaml")
    job["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["ttlSeconds"] = 7200  # workers after the cluster
    assert any("must not decrease" in e for e in operator_errors(job))
    cluster = load("raycluster.yaml")
    cluster["spec"]["rayVersion"] = "2.51.0"
    assert operator_errors(cluster) == ["authOptions.mode token needs rayVersion >= 2.52.0"]
    cluster = load("raycluster.yaml")
    cluster["spec"]["networkPolicy"] = {"mode": "DenyAll"}
    assert operator_errors(cluster) == ["spec.networkPolicy requires the RayClusterNetworkPolicy feature gate (off by default)"]
    service = load("rayservice.yaml")
    service["spec"]["upgradeStrategy"]["type"] = "Rolling"
    assert operator_errors(service) == ["upgradeStrategy.type Rolling is invalid"]


# --- who can reach a head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_token_auth_is_on_and_the_head_stays_inside_the_cluster(name):
    spec = cluster_spec(load(name))
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    for template in pod_templates(load(name)):
        pod = template["spec"]
        assert not pod.get("hostNetwork", False)
        assert all("hostPort" not in port for c in pod["containers"] for port in c.get("ports", []))
        # the token comes from KubeRay's Secret; a hard-coded one (or turning auth off) would be a leak
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env


def head_labels(manifest: dict) -> dict[str, str]:
    """A head pod's labels: its template's plus what KubeRay sets."""
    return {**cluster_spec(manifest)["headGroupSpec"]["template"]["metadata"].get("labels", {}),
            "ray.io/node-type": "head", "ray.io/cluster": manifest["metadata"]["name"]}


def worker_labels(manifest: dict) -> list[dict[str, str]]:
    return [{**g["template"]["metadata"].get("labels", {}), "ray.io/node-type": "worker",
             "ray.io/group": g["groupName"]} for g in cluster_spec(manifest)["workerGroupSpecs"]]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admits(policy: dict, *, pod: dict[str, str], namespace: dict[str, str], same_namespace: bool, port: int) -> bool:
    """Does this NetworkPolicy's ingress let a pod (labels, its namespace's labels) connect to `port`?"""
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule.get("from") or [{}]:
            assert "ipBlock" not in peer
            ns = selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer else same_namespace
            if ns and selects(peer.get("podSelector", {}), pod):
                return True
    return False


def test_the_head_network_policy_admits_the_cluster_the_submitter_the_operator_and_prometheus_only():
    policy = one(load_all("networkpolicy.yaml"), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    manifests = [load(n) for n in RAY_MANIFESTS]
    for manifest in manifests:  # it covers every head and no worker
        assert selects(policy["spec"]["podSelector"], head_labels(manifest))
        assert not any(selects(policy["spec"]["podSelector"], w) for w in worker_labels(manifest))

    here = {"kubernetes.io/metadata.name": "ml"}
    worker = worker_labels(load("raycluster.yaml"))[0]
    job = load("rayjob.yaml")["metadata"]["name"]
    submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    prometheus_ns = {"kubernetes.io/metadata.name": "prometheus-system"}
    allowed = [(worker, here, True, 6379), (worker, here, True, 8265), (submitter, here, True, 8265),
               (operator, {"kubernetes.io/metadata.name": "kuberay"}, False, 8265),
               ({"app.kubernetes.io/name": "prometheus"}, prometheus_ns, False, 8080),
               ({}, prometheus_ns, False, 44217)]
    denied = [({}, here, True, 8265),                      # any other pod of the namespace: not the job API
              (submitter, here, True, 6379),               # the submitter: the job API only
              ({"app": "web"}, {"kubernetes.io/metadata.name": "web"}, False, 8265),
              (operator, here, True, 6379),
              ({}, prometheus_ns, False, 8265)]
    for pod, ns, same, port in allowed:
        assert admits(policy, pod=pod, namespace=ns, same_namespace=same, port=port), (pod, port)
    for pod, ns, same, port in denied:
        assert not admits(policy, pod=pod, namespace=ns, same_namespace=same, port=port), (pod, port)


def test_the_network_policies_rules_have_kubernetes_shape(crds):
    """Each ingress rule, strictly, against the NetworkPolicyIngressRule schema KubeRay's CRD embeds."""
    schema = crd_schema(crds, "RayCluster")["properties"]["spec"]["properties"]["networkPolicy"]
    rule_schema = schema["properties"]["head"]["properties"]["ingressRules"]["items"]
    selector_schema = rule_schema["properties"]["from"]["items"]["properties"]["podSelector"]
    policies = load_all("networkpolicy.yaml") + [d for d in load_all("redis.yaml") if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert set(policy["spec"]) <= {"podSelector", "policyTypes", "ingress", "egress"}
        jsonschema.Draft7Validator(selector_schema).validate(policy["spec"]["podSelector"])
        for rule in policy["spec"]["ingress"]:
            jsonschema.Draft7Validator(rule_schema).validate(rule)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(rule_schema).validate({"form": [{}]})  # a typo is caught


# --- resources: the object store inside /dev/shm, GPU node selection ------------------------------------------


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_ray_start_params_are_ray_start_options_and_the_object_store_fits_shm(name):
    from ray.scripts.scripts import start

    options = {opt.lstrip("-") for param in start.params for opt in param.opts}
    for group, spec in groups(load(name)):
        params = spec.get("rayStartParams", {})
        assert set(params) <= options, f"{name} {group}: {set(params) - options} are not `ray start` options"
        pod = spec["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        shm = quantity(volume["emptyDir"]["sizeLimit"])
        assert volume["emptyDir"]["medium"] == "Memory"
        store = int(params["object-store-memory"])
        # Ray's default is 30 % of the memory limit (up to 200 GB), beyond these volumes: set it, and leave
        # a fifth of /dev/shm to NCCL and vLLM
        assert 75 * 2**20 <= store <= 0.8 * shm, f"{name} {group}: object store {store} in /dev/shm of {shm}"
        assert shm < quantity(container["resources"]["limits"]["memory"])  # a memory emptyDir counts against it


def gt_admits(expression: dict, value: int) -> bool:
    assert expression["operator"] == "Gt"
    return value > int(expression["values"][0])


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_gpu_workers_go_to_nodes_with_80_gb_gpus(name):
    for group in cluster_spec(load(name))["workerGroupSpecs"]:
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = terms["nodeSelectorTerms"]
        (expression,) = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
        # GPU feature discovery's label in MiB: A100 80GB, H100 80GB, H200 pass; A100 40GB and L40S do not
        assert all(gt_admits(expression, mib) for mib in (81920, 81559, 143771))
        assert not any(gt_admits(expression, mib) for mib in (40960, 46068))


# --- the RayJob frees its GPUs -------------------------------------------------------------------------------------


def test_rayjob_frees_its_gpu_workers_when_the_job_ends_and_has_deadlines():
    spec = load("rayjob.yaml")["spec"]
    rules = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        condition = dict(rule["condition"])
        ttl = condition.pop("ttlSeconds", 0)
        ((field, status),) = condition.items()
        rules[field, status, rule["policy"]] = ttl
    for status in ("SUCCEEDED", "FAILED"):
        assert rules["jobStatus", status, "DeleteWorkers"] == 0  # the 8 GPUs go as the job ends
        assert 0 < rules["jobStatus", status, "DeleteCluster"] <= 3600
    assert rules["jobDeploymentStatus", "Failed", "DeleteCluster"] == 0
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    # KubeRay gives the K8sJobMode submitter the cluster's token itself (SetContainerTokenAuthEnvVars):
    # nothing in the manifest may shadow RAY_AUTH_MODE / RAY_AUTH_TOKEN there
    assert spec["submissionMode"] == "K8sJobMode" and "submitterPodTemplate" not in spec
    assert not spec["rayClusterSpec"].get("enableInTreeAutoscaling", False)


# --- the RayService: upgrades, autoscaling, GCS fault tolerance ------------------------------------------------


def test_rayservice_upgrades_without_downtime_and_autoscales_gpu_pods():
    spec = load("rayservice.yaml")["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["excludeHeadPodFromServeSvc"] is True  # the head (num-cpus 0) has no replicas to route to
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert 0 < cluster["autoscalerOptions"]["idleTimeoutSeconds"] <= 600
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] < group["maxReplicas"]  # room for the autoscaler to add GPU pods


def gcs_ft_service() -> dict:
    patch = yaml.safe_load((K8S / "rayservice-gcs-ft.patch.yaml").read_text())
    return merge_patch(load("rayservice.yaml"), patch)


def test_gcs_fault_tolerance_option_validates_and_points_at_the_redis(crds):
    service = gcs_ft_service()
    assert crd_errors(crds, service) == []
    assert operator_errors(service) == []
    plain = load("rayservice.yaml")
    assert service["spec"]["serveConfigV2"] == plain["spec"]["serveConfigV2"]  # only the cluster changes
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis = load_all("redis.yaml")
    svc = one(redis, "Service")
    host, port = options["redisAddress"].rsplit(":", 1)
    assert host == svc["metadata"]["name"] and int(port) in {p["port"] for p in svc["spec"]["ports"]}
    deployment = one(redis, "Deployment")
    assert selects({"matchLabels": svc["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"] == options["redisPassword"]["valueFrom"]  # one Secret for both ends
    assert "$(REDIS_PASSWORD)" in container["args"]
    # only the Ray head (and KubeRay's cleanup Job, built from the head's template) reach Redis
    policy = one(redis, "NetworkPolicy")
    here = {"kubernetes.io/metadata.name": "ml"}
    assert admits(policy, pod=head_labels(plain), namespace=here, same_namespace=True, port=6379)
    assert not admits(policy, pod={"app": "other"}, namespace=here, same_namespace=True, port=6379)


# --- Prometheus and Grafana --------------------------------------------------------------------------------------


def test_pod_monitors_select_the_ray_pods_and_scrape_ports_they_have():
    monitors = {m["metadata"]["name"]: m for m in load_all("monitoring.yaml")}
    assert {m["apiVersion"] for m in monitors.values()} == {"monitoring.coreos.com/v1"}
    assert {m["kind"] for m in monitors.values()} == {"PodMonitor"}
    for monitor in monitors.values():
        assert monitor["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's selector
        assert set(monitor["spec"]) <= {"jobLabel", "selector", "namespaceSelector", "podMetricsEndpoints"}
    for manifest in (load(n) for n in RAY_MANIFESTS):
        head = monitors["almost-ray-head"]
        assert selects(head["spec"]["selector"], head_labels(manifest))
        assert all(selects(monitors["almost-ray-workers"]["spec"]["selector"], w) for w in worker_labels(manifest))
        assert not selects(head["spec"]["selector"], worker_labels(manifest)[0])
        head_ports = {p["name"] for c in cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
        for endpoint in head["spec"]["podMetricsEndpoints"]:
            # `metrics` (8080) is the port KubeRay adds to every Ray container; the others are declared here
            assert endpoint["port"] == "metrics" or endpoint["port"] in head_ports, endpoint["port"]
        env = {e["name"] for e in cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= env


# --- the `ray up` file -------------------------------------------------------------------------------------------


def test_ray_up_uses_an_explicit_ami_updates_apt_and_logs_in_to_the_registry():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    amis = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    (ami,) = amis  # every node boots the same image
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), ami
    commands = config["initialization_commands"]
    installs = [i for i, c in enumerate(commands) if "apt-get install" in c]
    updates = [i for i, c in enumerate(commands) if "apt-get update" in c]
    assert installs and updates and min(updates) < min(installs)
    registry = config["docker"]["image"].split("/")[0]
    (login,) = [c for c in commands if "docker login" in c]
    assert f"docker login {registry} " in login and "--password-stdin" in login  # no password on a command line
    assert all(t["node_config"].get("IamInstanceProfile") for t in config["available_node_types"].values())


def test_ray_up_nodes_share_the_auth_token_of_the_submitting_machine():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached only through `ray dashboard`'s SSH tunnel


def test_kinds_checked_here_are_the_ones_deployed():
    assert set(CRD_OF_KIND) == {load(n)["kind"] for n in RAY_MANIFESTS}
