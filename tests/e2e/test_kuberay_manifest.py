"""deploy/kuberay/raycluster.yaml: its pods against Kubernetes' schemas, the rest against its own.

``kubernetes-validate`` (the validator of the other deployment manifests)
has no schema for KubeRay's ``RayCluster`` kind, so the manifest is checked
in two parts: its pod templates, as ``PodTemplate`` objects, with
``kubernetes-validate --strict`` against Kubernetes' own schemas; and the
RayCluster fields around them with ``jsonschema`` against
deploy/kuberay/raycluster.schema.json, which covers the fields fedge's
manifest uses and refuses unknown ones. No Kubernetes cluster is involved:
what was not run is listed in docs/scale.md.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import tool

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "raycluster.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "raycluster.yaml").read_text()))
    assert len(docs) == 1
    loaded: dict[str, Any] = docs[0]
    return loaded


def _errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(doc)]


def test_manifest_is_valid(schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    assert _errors(schema, manifest) == []


def test_manifest_fits_how_fedge_runs_on_it(manifest: dict[str, Any]) -> None:
    spec = manifest["spec"]
    head = spec["headGroupSpec"]
    # The head runs the driver only: no actor may land there.
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        images |= {c["image"] for c in containers}
        # Ray's CPU count and the pod's CPU limit agree, so actors are not oversubscribed.
        assert group["rayStartParams"]["num-cpus"] == str(containers[0]["resources"]["limits"]["cpu"])
    assert len(images) == 1  # one fedge version on every pod


def _set(doc: dict[str, Any], path: list[Any], value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (["apiVersion"], "ray.io/v1alpha1", "'ray.io/v1' was expected"),
        (["kind"], "RayJob", "'RayCluster' was expected"),
        (["metadata", "name"], "Fedge_Sim", "does not match"),
        (["spec", "workerGroupSpecs", 0, "replicas"], -1, "less than the minimum"),
        (["spec", "workerGroupSpecs", 0, "replicas"], "4", "is not of type 'integer'"),
        # KubeRay takes ray start parameters as strings only.
        (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "is not of type 'string'"),
        (["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagePullPolicy"],
         "Sometimes", "is not one of"),
        (["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits",
          "memory"], "8 gigs", "is not valid"),
        (["spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "containerPort"],
         70000, "greater than the maximum"),
        (["spec", "workerGroupSpec"], [], "Additional properties are not allowed"),
        (["spec", "rayVersion"], "latest", "does not match"),
    ],
)
def test_schema_refuses_broken_manifests(
    schema: dict[str, Any], manifest: dict[str, Any], path: list[Any], value: object, fragment: str
) -> None:
    errors = _errors(schema, _set(manifest, path, value))
    assert errors and any(fragment in e for e in errors), errors


def test_schema_requires_a_head_and_images(schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    no_head = copy.deepcopy(manifest)
    del no_head["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in _errors(schema, no_head))
    no_image = copy.deepcopy(manifest)
    del no_image["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    assert any("'image' is a required property" in e for e in _errors(schema, no_image))


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"fedge-sim-{i}"},
             "template": t} for i, t in enumerate(templates)]


def _validate_pods(doc: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    validate = tool("kubernetes-validate", "the kubernetes-validate package (dev extra)")
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all(_pod_templates(doc)))
    return subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True,
                          check=False, timeout=300)


def test_pod_templates_pass_kubernetes_validate(manifest: dict[str, Any], tmp_path: Path) -> None:
    result = _validate_pods(manifest, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 1 + len(manifest["spec"]["workerGroupSpecs"])


def test_kubernetes_validate_catches_a_bad_pod(manifest: dict[str, Any], tmp_path: Path) -> None:
    bad = copy.deepcopy(manifest)
    container = bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")  # a typo
    result = _validate_pods(bad, tmp_path)
    assert result.returncode != 0, result.stdout
