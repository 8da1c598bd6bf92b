"""The Kubernetes manifests in deploy/k8s/ stay true to the fedmusk command and keep their security settings.

The coordinator Jobs' args are parsed by the real CLI with the image's entrypoint and environment, the federation
configuration they mount is loaded by fedmusk, and the pods, the Service and the Secret template keep their
lock-down. Offline and fast: nothing is run but the parser and the certificate layout script.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from _deploy_helpers import IMAGE_DOCKERFILES, K8S, dockerfile_entrypoint, dockerfile_env, fedmusk_env, parse_fedmusk


def k8s_documents(folder: Path = K8S, recursive: bool = True) -> dict[Path, list[dict]]:
    files = sorted(folder.rglob("*.yaml") if recursive else folder.glob("*.yaml"))
    return {p: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in files}


def coordinator_jobs() -> list[dict]:
    return [d for docs in k8s_documents().values() for d in docs if d["kind"] == "Job"]


def test_k8s_manifests_parse_and_stay_in_one_namespace():
    docs = k8s_documents()
    assert docs and all(docs.values())
    kinds = {d["kind"] for ds in docs.values() for d in ds}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Job", "Service", "NetworkPolicy"} <= kinds
    for path, ds in docs.items():
        for d in ds:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == "fedmusk", path


def test_k8s_coordinator_args_parse_against_the_cli(monkeypatch):
    entry = dockerfile_entrypoint(IMAGE_DOCKERFILES["coordinator"])
    image_env = dockerfile_env(IMAGE_DOCKERFILES["coordinator"])
    jobs = coordinator_jobs()
    assert len(jobs) == 2
    for job in jobs:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = {**image_env, **{e["name"]: e["value"] for e in container.get("env", [])}}
        command, params = parse_fedmusk([*entry, *container["args"]][1:], fedmusk_env(env), monkeypatch)
        assert command == "server" and params["host"] == "0.0.0.0" and params["port"] == 9092
        assert params["resume"] is (job["metadata"]["name"] == "fedmusk-coordinator-resume")


def test_k8s_resume_job_differs_only_by_name_and_resume():
    first, resumed = sorted(coordinator_jobs(), key=lambda j: j["metadata"]["name"])
    resumed_args = resumed["spec"]["template"]["spec"]["containers"][0]["args"]
    resumed["spec"]["template"]["spec"]["containers"][0]["args"] = [a for a in resumed_args if a != "--resume"]
    resumed["metadata"]["name"] = first["metadata"]["name"]
    assert resumed == first


def test_k8s_coordinator_pod_is_locked_down_and_probed_on_the_superlink_port():
    for job in coordinator_jobs():
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for container in [*spec["initContainers"], *spec["containers"]]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"]
        (main,) = spec["containers"]
        (port,) = main["ports"]
        assert port["containerPort"] == 9092
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["tcpSocket"]["port"] in (9092, port["name"])
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert mounts["/certs"]["readOnly"] is True and "/tmp" in mounts and "/state" in mounts
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        assert "persistentVolumeClaim" in volumes[mounts["/state"]["name"]]


def test_k8s_certs_layout_script_builds_the_certs_folder(tmp_path, monkeypatch):
    from fedmusk.ops import certs

    source = certs.init_ca(tmp_path / "made")
    certs.add_site(tmp_path / "made", "hospital-a")
    secret = tmp_path / "secret-in"
    (secret / "..2026_data").mkdir(parents=True)  # what a Secret volume looks like: hidden data folder + links
    files = {"ca.crt": source.ca_cert, "server.crt": source.server_cert, "server.key": source.server_key,
             "site.hospital-a.pub": source.site_dir("hospital-a") / "site.pub"}  # fmt: skip
    for key, path in files.items():
        (secret / "..2026_data" / key).write_bytes(path.read_bytes())
        (secret / "..2026_data" / key).chmod(0o440)
        (secret / key).symlink_to(Path("..2026_data") / key)
    (init,) = coordinator_jobs()[0]["spec"]["template"]["spec"]["initContainers"]
    script = init["args"][0].replace('"/secret-in"', repr(str(secret))).replace('"/certs"', repr(str(tmp_path / "c")))
    exec(compile(script, "certs-layout", "exec"), {})
    certs.check_server_files(tmp_path / "c")  # server.key 0600, signed by the CA: what fedmusk server checks
    assert list(certs.site_public_keys(tmp_path / "c")) == ["hospital-a"]


def test_k8s_federation_config_is_a_valid_fedmusk_configuration(tmp_path):
    from fedmusk.config import check_config, load_config

    (configmap,) = [d for d in k8s_documents()[K8S / "configmap.yaml"] if d["kind"] == "ConfigMap"]
    (tmp_path / "federation.yaml").write_text(configmap["data"]["federation.yaml"])
    cfg = load_config([tmp_path / "federation.yaml"], [])  # an unknown or misspelt key raises here
    check_config(cfg)
    (container,) = coordinator_jobs()[0]["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(cfg.model.tokenizer).parent) in mounts, "the coordinator reads the tokenizer"


def test_k8s_service_exposes_only_the_superlink_port_to_listed_sources():
    (service,) = k8s_documents()[K8S / "service.yaml"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 9092 and port["protocol"] == "TCP"
    assert service["spec"]["type"] in ("LoadBalancer", "NodePort") and service["spec"]["loadBalancerSourceRanges"]


def test_k8s_secret_is_only_a_template_outside_the_applied_folder():
    applied = [d for docs in k8s_documents(K8S, recursive=False).values() for d in docs]
    assert not [d for d in applied if d["kind"] == "Secret"], "`kubectl apply -f deploy/k8s/` must not apply a Secret"
    (secret,) = k8s_documents()[K8S / "templates" / "certs-secret.yaml"]
    assert all(v.startswith("REPLACE") for v in secret["stringData"].values())
