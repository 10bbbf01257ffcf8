"""A small kustomize, for the tests: renders deploy/k8s the way `kubectl kustomize` would, for
the features those kustomizations use (no kustomize binary can be installed here).

Supported: resources (files and directories), namespace, labels (pairs: metadata labels
only, as kustomize's default), images (newName, newTag), configMapGenerator and
secretGenerator (literals, envs; behavior create or merge; disableNameSuffixHash only),
patches (strategic merge from a file: maps merged, lists of named items merged by name).
Any other field is an error, so a kustomization never uses something this renders wrongly.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "configMapGenerator",
             "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


class Unsupported(Exception):
    pass


def render(folder: Path, env_files: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The resources of the kustomization in `folder`. `env_files` maps an env file name to the
    file to read instead (e.g. secrets.env -> secrets.env.example)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise Unsupported(f"{folder}: kustomization fields this renderer does not know: {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            resources += render(path, env_files)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in spec.get(key, []):
            _generate(folder, resources, kind, generator, env_files or {})
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{folder}: only patches with a path are supported: {patch}")
        for doc in yaml.safe_load_all((folder / patch["path"]).read_text()):
            target = _find(resources, doc["kind"], doc["metadata"]["name"])
            merged = merge(target, doc)
            resources[resources.index(target)] = merged
    for image in spec.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for label in spec.get("labels", []):
        if set(label) - {"pairs"}:
            raise Unsupported(f"{folder}: labels with {sorted(set(label) - {'pairs'})}")
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    return resources


def _generate(folder: Path, resources: list[dict[str, Any]], kind: str, generator: dict[str, Any],
              env_files: dict[str, str]) -> None:
    if set(generator) - {"name", "literals", "envs", "behavior", "options"}:
        raise Unsupported(f"{folder}: generator fields {sorted(generator)}")
    if generator.get("options") != {"disableNameSuffixHash": True}:
        raise Unsupported(f"{folder}: generators need options: {{disableNameSuffixHash: true}} here")
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for name in generator.get("envs", []):
        text = (folder / env_files.get(name, name)).read_text()
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    behavior = generator.get("behavior", "create")
    if behavior == "merge":
        target = _find(resources, kind, generator["name"])
        target.setdefault("data", {}).update(_encode(kind, data))
    elif behavior == "create":
        resources.append({"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]},
                          **({"type": "Opaque"} if kind == "Secret" else {}), "data": _encode(kind, data)})
    else:
        raise Unsupported(f"{folder}: generator behavior {behavior}")


def _encode(kind: str, data: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()} if kind == "Secret" else data


def _find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise Unsupported(f"no {kind} {name} to patch or merge into")


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get(
        "template", {}).get("spec") or {}
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as these manifests need: maps merge key by key, lists of maps that
    all have a name merge item by item, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = copy.deepcopy(base)
        for item in patch:
            names = [i["name"] for i in out]
            if item["name"] in names:
                out[names.index(item["name"])] = merge(out[names.index(item["name"])], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)
