"""The deployment files validate offline: KubeRay manifests against the KubeRay 1.7 CRDs (strict about
unknown fields, as `kubectl apply --validate=strict`), their `serveConfigV2` against Ray Serve's own
schema, the `ray up` YAML against the schema inside the ray wheel, and one image name everywhere."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT.parent / "shared" / "kuberay"
K8S = ROOT / "k8s"
CLUSTER_YAML = ROOT / "cluster" / "gpu-cluster.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE = re.compile(r"\bregistry\.example\.com/almost-ray:[\w.-]+")
CRD_OF_KIND = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
RAY_MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    """`../shared/kuberay` of a developer checkout (the CRDs are third-party: never committed here)."""
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (only in the developers' checkout)")
    return KUBERAY


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI schema that rejects unknown keys: every object schema listing `properties`
    gets `additionalProperties: false`, unless it is `x-kubernetes-preserve-unknown-fields` or already
    says what extra keys may hold. That is what `kubectl apply --validate=strict` checks; the API server
    itself silently drops unknown fields, which hides typos such as `rayStartParam`."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_schema(crds: Path, kind: str, version: str = "v1") -> dict:
    """The strict schema of one CRD version (1 MB YAML files: parsed once, with libyaml when present)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crds / f"ray.io_{CRD_OF_KIND[kind]}.yaml").read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind} CRD has no version {version}")


def crd_errors(crds: Path, manifest: dict) -> list[str]:
    assert manifest["apiVersion"] == "ray.io/v1", "KubeRay 1.7 serves ray.io/v1"
    validator = jsonschema.Draft7Validator(crd_schema(crds, manifest["kind"]))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        manifest["kind"]
    ]


def pod_templates(manifest: dict) -> list[dict]:
    spec = cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


# --- KubeRay ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifest_validates_against_the_kuberay_crd(kuberay_crds, name):
    manifest = load(name)
    assert manifest["kind"] in CRD_OF_KIND
    assert crd_errors(kuberay_crds, manifest) == []


def test_strict_validation_rejects_unknown_fields_at_any_depth(kuberay_crds):
    """The guard can fail: a typo in the cluster spec, in a worker group and deep in a pod container."""
    for mutate, where in [
        (lambda m: m["spec"].__setitem__("rayVersio", "2.60.0"), "spec"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].__setitem__("rayStartParam", {}), "spec.workerGroupSpecs.0"),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].__setitem__("gpus", 8),
            "spec.workerGroupSpecs.0.template.spec.containers.0",
        ),
    ]:
        manifest = load("raycluster.yaml")
        mutate(manifest)
        errors = crd_errors(kuberay_crds, manifest)
        assert len(errors) == 1 and errors[0].startswith(f"{where}: Additional properties are not allowed"), errors
    manifest = load("rayjob.yaml")
    manifest["spec"]["activeDeadlineSeconds"] = "a day"
    assert any("'a day' is not of type 'integer'" in e for e in crd_errors(kuberay_crds, manifest))


def test_strict_keeps_schemas_that_allow_unknown_fields():
    preserved = {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True}
    mapping = {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}}
    assert "additionalProperties" not in strict(preserved)
    assert strict(mapping)["additionalProperties"] == {"type": "string"}
    assert strict({"properties": {"x": {"properties": {"y": {}}}}})["properties"]["x"]["additionalProperties"] is False


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_gpu_workers_request_gpus_tolerate_the_taint_and_share_the_volume(name):
    manifest = load(name)
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == dockerfile_ray_version()
    for template in pod_templates(manifest):
        mounts = {m["mountPath"]: m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert mounts["/mnt/shared"]["name"] == "shared"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in template["spec"]["volumes"]}
        assert claims["shared"] == load("pvc.yaml")["metadata"]["name"]
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_pvc_is_read_write_many():
    pvc = load("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["apiVersion"] == "v1"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_pipeline_on_the_shared_volume():
    spec = load("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/rlsf.py"]
    config = argv[argv.index("--config") + 1]
    assert config == "configs/paper-llama.yaml"
    # jobs/rlsf.py is the pipeline's entry point (another branch); the config must exist here and load.
    from almost_ray.config import load_config

    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert overrides == ["runs_dir=/mnt/shared/runs"]
    assert load_config(ROOT / config, overrides).runs_dir == Path("/mnt/shared/runs")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # the project directory inside the image; Ray checks a local working_dir exists, which it does only there
    assert runtime_env.pop("working_dir") == dockerfile_workdir()
    ray.runtime_env.RuntimeEnv(**runtime_env)  # Ray's own check of the other runtime_env fields


def test_paper_config_model_paths_are_on_the_shared_volume():
    """configs/paper-llama.yaml reads /models/... and /data/...: the pods mount the volume's models/ and
    data/ there, so the config runs unchanged."""
    def absolute_paths(node):
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            return [p for child in node for p in absolute_paths(child)]
        return [node] if isinstance(node, str) and node.startswith("/") else []

    paths = absolute_paths(yaml.safe_load((ROOT / "configs" / "paper-llama.yaml").read_text()))
    roots = {"/" + p.split("/")[1] for p in paths}
    assert paths and roots <= {"/models", "/data"}, roots
    for template in pod_templates(load("rayjob.yaml")):
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        for root in roots:
            assert mounts[root]["subPath"] == root.strip("/") and mounts[root]["readOnly"] is True


def serve_config() -> dict:
    return yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_serve_config_v2_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    (app,) = schema.applications
    assert app.import_path == "almost_ray.serve.app:build_app"
    assert app.args["chat"]["model"].startswith("/mnt/shared/runs/")
    assert app.args["reward"]["model"].startswith("/mnt/shared/runs/")
    chat, reward = app.args["chat"], app.args["reward"]
    # the chat model's GPUs are vLLM's tensor-parallel group per replica; the RM's are its num_gpus
    gpus = [app.args["llm"]["tensor_parallel_size"] * chat["deployment"]["autoscaling_config"]["min_replicas"],
            reward["deployment"]["num_gpus"] * reward["deployment"]["autoscaling_config"]["min_replicas"]]
    spec = cluster_spec(load("rayservice.yaml"))
    (group,) = spec["workerGroupSpecs"]
    per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert sum(gpus) <= group["minReplicas"] * per_pod  # the replicas fit the workers that are always there
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate({"applications": [{"name": "x"}]})  # no import_path: the check bites


def test_serve_args_validate_with_the_serve_config():
    try:
        from almost_ray.serve.config import ServeConfig
    except ImportError:
        pytest.skip("almost_ray.serve.config.ServeConfig is not in this branch yet (the Serve issue)")
    (app,) = serve_config()["applications"]
    ServeConfig.model_validate(app["args"])


# --- the cluster launcher ----------------------------------------------------------------------------------


def launcher_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_up_yaml_validates_against_the_schema_in_the_ray_wheel():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    jsonschema.Draft7Validator(launcher_schema()).validate(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]
    assert all(t.get("max_workers", 0) <= config["max_workers"] for t in workers)
    commands = "\n".join(config.get("initialization_commands", []) + config.get("setup_commands", []))
    assert "/mnt/shared" in commands  # the shared runs directory is mounted on every node


def test_ray_up_yaml_passes_rays_own_preparation_and_checks():
    """What `ray up` runs before touching the cloud (commands._bootstrap_config): defaults merged in,
    then validate_config (the schema plus its cross-field checks). Private API: skipped if it moves."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as err:
        pytest.skip(f"ray's launcher internals moved ({err}); the schema test above still runs")
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)


def test_ray_up_schema_check_can_fail():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["docker"]["imagee"] = config["docker"]["image"]
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        jsonschema.Draft7Validator(launcher_schema()).validate(config)


# --- the image ---------------------------------------------------------------------------------------------


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, f"docker/Dockerfile has no ARG {name}=..."
    return match.group(1)


def dockerfile_ray_version() -> str:
    return dockerfile_arg("RAY_VERSION")


def dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M)[-1]


def test_dockerfile_pins_a_ray_version_the_project_admits():
    text = DOCKERFILE.read_text()
    version = dockerfile_ray_version()
    assert re.search(r"^FROM rayproject/ray-llm:\$\{RAY_VERSION\}-", text, re.M)  # the tag: test_gpu_lock.py
    requirements = [Requirement(r) for r in importlib.metadata.requires("almost-ray")]
    (ray_req,) = [r for r in requirements if r.name == "ray" and r.marker is None]
    assert ray_req.specifier.contains(version), f"ray {version} is outside pyproject's {ray_req}"
    assert "--requirement docker/requirements-gpu.lock" in text and "pip install --no-cache-dir --no-deps ." in text
    assert re.search(r"^USER ray$", text, re.M)  # the base image's non-root user
    for source in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"docker/Dockerfile copies {name}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)  # the build context (and the RayJob working_dir) stays small


def test_one_image_name_everywhere():
    files = [K8S / n for n in RAY_MANIFESTS] + [CLUSTER_YAML]
    names = {path.name: set(IMAGE.findall(path.read_text())) for path in files}
    assert all(len(found) == 1 for found in names.values()), names
    (image,) = set.union(*names.values())
    assert image.endswith(":" + importlib.metadata.version("almost-ray"))  # the image is tagged like the package
    docs = (ROOT / "docs" / "gpu-cluster.md").read_text()
    assert image in docs


# --- the docs say what the files do ---------------------------------------------------------------------------


def test_docs_name_the_files_resources_and_commands_that_exist():
    docs = (ROOT / "docs" / "gpu-cluster.md").read_text() + (ROOT / "cluster" / "README.md").read_text()
    for path in set(re.findall(r"(?<![\w/])((?:k8s|cluster|docker)/[\w.-]+)", docs)):
        assert (ROOT / path).exists(), f"the docs name {path}, which does not exist"
    job, service, cluster = load("rayjob.yaml"), load("rayservice.yaml"), load("raycluster.yaml")
    assert f"kubectl get rayjob {job['metadata']['name']} -w" in docs
    assert f"kubectl get rayservice {service['metadata']['name']} -w" in docs
    assert f"svc/{service['metadata']['name']}-serve-svc 8000:8000" in docs  # KubeRay's <RayService>-serve-svc
    assert f"svc/{cluster['metadata']['name']}-head-svc 8265:8265" in docs
    submitted = re.findall(r"^\s*(python jobs/rlsf\.py .+)$", docs, re.M)
    assert submitted and set(submitted) == {job["spec"]["entrypoint"]}
    worker = cluster["spec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert f"asks for {limits['cpu']} CPUs and {limits['memory']}" in docs
    assert re.search(rf"GPU workers autoscaled\s+{worker['minReplicas']}–{worker['maxReplicas']}\b", docs)


def test_docs_resource_table_is_the_plan_of_the_paper_config():
    """The per-stage table in docs/gpu-cluster.md is what `almost-ray plan` prints for the paper config on the
    node k8s/rayjob.yaml asks for (regenerate it with the command the docs give when the config changes)."""
    from almost_ray.config import load_config
    from almost_ray.plan.cluster_plan import make_plan, table

    docs = (ROOT / "docs" / "gpu-cluster.md").read_text()
    command = re.search(r"almost-ray plan -c configs/paper-llama\.yaml --nodes (\d+) --gpus-per-node (\d+) "
                        r"--gpu-memory-gb (\d+) \\\s+--cpus-per-node (\d+) --model-configs configs/model-shapes", docs)
    assert command, "docs/gpu-cluster.md does not give the plan command of the paper config"
    nodes, gpus, memory, cpus = (int(g) for g in command.groups())
    worker = load("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (worker["replicas"], int(limits["nvidia.com/gpu"])) == (nodes, gpus)  # the node the RayJob asks for
    plan = make_plan(load_config(ROOT / "configs" / "paper-llama.yaml"), nodes, gpus, memory,
                     ROOT / "configs" / "model-shapes", cpus)
    assert plan.fits, plan.problems
    assert table(plan) in docs, "docs/gpu-cluster.md's plan table is not what `almost-ray plan` prints"

