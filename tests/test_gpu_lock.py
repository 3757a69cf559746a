"""The GPU environment hangs together, checked offline: docker/requirements-gpu.lock pins a version of every
package pyproject.toml asks for (core dependencies and the [gpu] extra, with Ray's own `llm` extra read
from the installed ray wheel) that satisfies the requirement on the image's platform; the [gpu] extra's
vLLM is the one Ray's `llm` extra pins; the Dockerfile starts from Ray's LLM image of the locked Ray.
The lock itself is resolved by pip with network access (docker/lock_gpu.py)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "requirements-gpu.lock"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# The image's interpreter and platform (Ray's `ray-llm:<ray>-py312-cu130`, Ubuntu 22.04 on x86_64).
TARGET = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def parse_lock(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        assert match, f"requirements-gpu.lock:{number}: not a `name==version` pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements-gpu.lock:{number}: {name} pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def project_requirements() -> list[tuple[Requirement, str]]:
    """pyproject.toml's core dependencies and [gpu] extra, each with the extra it is evaluated under."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [(Requirement(r), "") for r in project["dependencies"]] + [
        (Requirement(r), "gpu") for r in project["optional-dependencies"]["gpu"]
    ]


def applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({**TARGET, "extra": extra})


def extra_requirements(name: str, version: Version, extras: set[str]) -> list[tuple[Requirement, str]] | None:
    """The requirements `name[extras]` adds, from the installed distribution when it is the locked version
    (the ray wheel is installed by `make`); None when the metadata at that version is not here."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if Version(dist.version) != version:
        return None
    reqs = [Requirement(r) for r in dist.requires or []]
    return [(r, extra) for r in reqs for extra in sorted(extras) if r.marker is not None and applies(r, extra)
            and not applies(r, "")]


def unmet(requirements: list[tuple[Requirement, str]], pins: dict[str, Version]) -> list[str]:
    """What the lock does not satisfy, one line each, following the extras of locked packages whose metadata
    at the locked version is installed here."""
    problems, seen = [], set()
    todo = list(requirements)
    while todo:
        req, extra = todo.pop()
        key = (str(req), extra)
        if key in seen or not applies(req, extra):
            continue
        seen.add(key)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in the lock")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: the lock pins {name}=={pins[name]}")
            continue
        if req.extras:
            more = extra_requirements(name, pins[name], set(req.extras))
            if more is not None:
                todo.extend(more)
    return sorted(problems)


@pytest.fixture(scope="module")
def pins() -> dict[str, Version]:
    return parse_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def locked_ray_installed(pins) -> None:
    """Ray's extras are read from the installed ray wheel, which must be the locked version."""
    installed = Version(importlib.metadata.version("ray"))
    if installed != pins["ray"]:
        pytest.skip(f"ray {installed} is installed here, the lock has ray {pins['ray']}: its extras cannot be read")


def test_the_lock_satisfies_every_core_and_gpu_requirement(pins):
    requirements = project_requirements()
    assert {r.name for r, extra in requirements if extra == "gpu"} == {"ray", "vllm"}
    assert unmet(requirements, pins) == []


def test_the_lock_satisfies_ray_llm_extra(pins, locked_ray_installed):
    (gpu_ray,) = [r for r, extra in project_requirements() if extra == "gpu" and r.name == "ray"]
    llm = extra_requirements("ray", pins["ray"], set(gpu_ray.extras))
    assert {canonicalize_name(r.name) for r, _ in llm} >= {"vllm", "nixl", "fastapi", "starlette"}
    assert unmet(llm, pins) == []


def test_the_check_fails_on_a_missing_or_wrong_pin(pins, locked_ray_installed):
    requirements = project_requirements()
    without_datasets = {k: v for k, v in pins.items() if k != "datasets"}
    assert unmet(requirements, without_datasets) == ["datasets>=4: not in the lock"]
    old_ray = {**pins, "ray": Version("2.54.0")}
    assert any(p.startswith("ray[data,serve,train]>=2.55") for p in unmet(requirements, old_ray))
    # a requirement of Ray's llm extra (followed through the ray wheel's metadata)
    old_fastapi = {**pins, "fastapi": Version("0.100.0")}
    assert any(p.startswith("fastapi>=0.133") for p in unmet(requirements, old_fastapi)), unmet(requirements, old_fastapi)
    with pytest.raises(AssertionError, match="not a `name==version` pin"):
        parse_lock("torch>=2.13\n")


def test_gpu_vllm_is_the_one_ray_llm_pins(pins, locked_ray_installed):
    """ray.serve.llm and ray.data.llm are built and tested against the vLLM of Ray's `llm` extra; our own
    vLLM calls (models/vllm_backend.py, rl/rollout.py, rl/vllm_sync.py, adapters/rules_vllm.py) are read
    against that version too."""
    ray_llm = [Requirement(r) for r in importlib.metadata.requires("ray") or []]
    (ray_vllm,) = [r for r in ray_llm if r.name == "vllm" and r.marker and r.marker.evaluate({**TARGET, "extra": "llm"})]
    (gpu_vllm,) = [r for r, extra in project_requirements() if extra == "gpu" and r.name == "vllm"]
    assert gpu_vllm.specifier == ray_vllm.specifier, (gpu_vllm, ray_vllm)
    assert ray_vllm.specifier.contains(pins["vllm"])


def test_the_gpu_image_runs_the_torch_that_ci_runs(pins):
    """The CPU tests and the GPU image run one torch version, so what passes here runs there."""
    makefile = (ROOT / "Makefile").read_text()
    (cpu_torch,) = re.findall(r"^TORCH_PIN \?= torch==(\S+)$", makefile, re.M)
    assert pins["torch"] == Version(cpu_torch)


def test_dockerfile_starts_from_ray_llm_of_the_locked_ray_and_installs_the_lock(pins):
    text = DOCKERFILE.read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert Version(ray_version) == pins["ray"]
    (gpu_ray,) = [r for r, extra in project_requirements() if extra == "gpu" and r.name == "ray"]
    assert gpu_ray.extras == {"llm"} and str(gpu_ray.specifier) == f"=={ray_version}"
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    py = TARGET["python_version"].replace(".", "")
    assert base == f"rayproject/ray-llm:${{RAY_VERSION}}-py{py}-cu130"
    assert "pip install --no-cache-dir --no-deps --requirement docker/requirements-gpu.lock" in text
    assert "pip check" in text


def test_the_lock_records_how_it_was_resolved():
    """The header holds the exact commands, and docs/gpu-cluster.md gives the same ones."""
    header = [line[4:] for line in LOCK.read_text().splitlines() if line.startswith("#   ")]
    (resolve,) = [c for c in header if "--dry-run" in c]
    for flag in ("--report", "--ignore-installed", "--only-binary=:all:", "--python-version 3.12",
                 "--platform manylinux_2_35_x86_64", "--platform manylinux_2_17_x86_64", "'.[gpu]'"):
        assert flag in resolve, flag
    docs = (ROOT / "docs" / "gpu-cluster.md").read_text()
    for command in header:
        assert command in docs, f"docs/gpu-cluster.md does not give: {command}"


def test_the_recorded_commands_are_the_ones_docker_lock_gpu_runs():
    """A change to docker/lock_gpu.py (a platform tag, a flag) shows here until the lock is resolved again."""
    import importlib.util
    import shlex
    import sys

    spec = importlib.util.spec_from_file_location("lock_gpu", ROOT / "docker" / "lock_gpu.py")
    lock_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_gpu)
    shown = [shlex.join(["python3.12" if a == sys.executable else a for a in cmd])
             for cmd in lock_gpu.commands("WHEELS", "REPORT")]
    header = [line[4:] for line in LOCK.read_text().splitlines() if line.startswith("#   ")]
    assert header == shown
