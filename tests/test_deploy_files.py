"""The operators' files in deploy/ stay true to the fedmusk command and keep their security settings.

Every ``fedmusk ...`` command line written in deploy/ (compose commands, systemd ExecStart= with the env examples,
bootstrap.sh and the shell blocks of deploy/README.md; the Kubernetes args in test_deploy_k8s.py) is parsed by the
real CLI, so a renamed or removed option fails here rather than on a hospital's machine. Offline and fast: nothing is
run but the parser (and ``systemd-analyze verify`` where it exists).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from _deploy_helpers import (
    COMPOSE,
    DEPLOY,
    DOCKER,
    IMAGE_DOCKERFILES,
    ROOT,
    SYSTEMD,
    active_env_file,
    declared_envvars,
    dockerfile_entrypoint,
    dockerfile_env,
    dockerfile_instructions,
    env_file,
    fedmusk_env,
    parse_fedmusk,
)

# --- Docker --------------------------------------------------------------------------------------------------------


def test_images_run_fedmusk_server_and_client_as_a_non_root_user():
    for role, path in IMAGE_DOCKERFILES.items():
        steps = dockerfile_instructions(path)
        assert dockerfile_entrypoint(path) == ["fedmusk", "server" if role == "coordinator" else "client"]
        users = [rest for word, rest in steps if word == "USER"]
        assert users and not users[-1].startswith(("root", "0")), f"{path.name}: the last USER must not be root"
        assert any(w == "RUN" and "pip install" in r and "torch==2.13.0" in r for w, r in steps), path.name
        env = dockerfile_env(path)
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"
        unknown = set(fedmusk_env(env)) - declared_envvars("server" if role == "coordinator" else "client")
        assert not unknown, f"{path.name} sets variables fedmusk does not read: {unknown}"


def test_coordinator_image_checks_that_its_proxy_is_installed():
    runs = [r for w, r in dockerfile_instructions(IMAGE_DOCKERFILES["coordinator"]) if w == "RUN"]
    assert any("/src/fedmusk" in r and "caddy version" in r for r in runs), "caddy comes with fedmusk's install"


def test_torch_is_installed_before_fedmusk_so_pip_never_pulls_another_build():
    for path in IMAGE_DOCKERFILES.values():
        runs = [r for w, r in dockerfile_instructions(path) if w == "RUN" and "pip install" in r]
        torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
        fedmusk_at = next(i for i, r in enumerate(runs) if "/src/fedmusk" in r)
        assert torch_at < fedmusk_at and "--index-url" in runs[torch_at]
    assert "whl/cpu" in (DOCKER / "coordinator.Dockerfile").read_text()


def test_coordinator_healthcheck_is_a_python_connect_to_the_superlink_port():
    (check,) = [r for w, r in dockerfile_instructions(IMAGE_DOCKERFILES["coordinator"]) if w == "HEALTHCHECK"]
    argv = yaml.safe_load(check.split("CMD", 1)[1].strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "healthcheck", "exec")  # a syntax error would make the container unhealthy forever
    assert "create_connection" in argv[2] and "9092" in argv[2]


def test_build_context_leaves_out_environments_runs_slides_and_keys():
    patterns = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip()}
    for needed in (".venv", ".cache", "runs", "mlruns", "**/*.svs", "**/*.dcm", "**/.fedmusk", "deploy/compose/data"):
        assert needed in patterns, f".dockerignore must exclude {needed}"


def test_image_ships_the_configs_the_compose_demo_names():
    text = (DOCKER / "coordinator.Dockerfile").read_text()
    assert "COPY configs /opt/fedmusk/venv/share/fedmusk/configs" in text
    assert (ROOT / "configs" / "demo.yaml").is_file()


# --- compose -------------------------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]


def service_command(service: dict) -> tuple[list[str], dict[str, str]]:
    """The service's full fedmusk command line (image entrypoint + command) and its FEDMUSK_* environment."""
    dockerfile = ROOT / service["build"]["dockerfile"]
    entry = service.get("entrypoint") or dockerfile_entrypoint(dockerfile)
    env = dockerfile_env(dockerfile)
    extra = service.get("environment") or {}
    env.update(extra if isinstance(extra, dict) else dict(e.split("=", 1) for e in extra))
    return [*entry, *[str(a) for a in service.get("command", [])]], fedmusk_env(env)


def test_compose_commands_parse_against_the_cli(monkeypatch):
    for name, service in compose_services().items():
        argv, env = service_command(service)
        assert argv[0] == "fedmusk", name
        command, params = parse_fedmusk(argv[1:], env, monkeypatch)
        assert command == ("server" if name == "coordinator" else "client"), name


def test_compose_hospitals_dial_the_coordinator_by_the_name_in_its_certificate(monkeypatch):
    services = compose_services()
    _, server = parse_fedmusk(service_command(services["coordinator"])[0][1:], {}, monkeypatch)
    assert server["host"] == "0.0.0.0" and server["port"] == 9092
    hospitals = [n for n in services if n != "coordinator"]
    assert len(hospitals) == 3
    for name in hospitals:
        _, client = parse_fedmusk(service_command(services[name])[0][1:], {}, monkeypatch)
        assert client["superlink"] == "coordinator:9092" and client["name"] == name
    assert re.search(r"certs init \S+ --host coordinator", (COMPOSE / "bootstrap.sh").read_text())


def test_compose_coordinator_mounts_its_certificates_read_only_and_never_the_ca_key():
    mounts = {m["target"]: m for m in compose_services()["coordinator"]["volumes"]}
    certs = {t: m for t, m in mounts.items() if t.startswith("/certs")}
    assert set(certs) == {"/certs/ca/ca.crt", "/certs/superlink", "/certs/sites"}
    assert all(m.get("read_only") is True for m in certs.values())
    for target, mount in certs.items():
        assert mount["source"].endswith(target), (target, mount["source"])
    assert {t for t, m in mounts.items() if not m.get("read_only")} == {"/state"}


def test_every_compose_hospital_mounts_its_own_site_read_only_and_only_its_cache_writable():
    for name, service in compose_services().items():
        mounts = {m["target"]: m for m in service["volumes"]}
        if name == "coordinator":
            continue
        assert mounts["/site"].get("read_only") is True, f"{name} must mount the site folder read-only"
        assert mounts["/secrets"].get("read_only") is True
        assert mounts["/site"]["source"].endswith(f"/cohort/{name}")
        assert mounts["/site/.fedmusk"]["source"].endswith(f"/cohort/{name}/.fedmusk")
        # its own key pair and ca.crt, made at the hospital: nothing from the coordinator's certificate folder
        assert mounts["/secrets"]["source"].endswith(f"/hospitals/{name}"), "each hospital gets only its own keys"
        assert "/certs" not in mounts["/secrets"]["source"]
        writable = {t for t, m in mounts.items() if not m.get("read_only")}
        assert writable == {"/site/.fedmusk"}, f"{name} may write only its cache: {writable}"
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"]


def test_compose_gpu_override_only_adds_gpus_to_the_hospitals():
    override = yaml.safe_load((COMPOSE / "docker-compose.gpu.yml").read_text())["services"]
    assert set(override) == {n for n in compose_services() if n != "coordinator"}
    for service in override.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "command" not in service and "volumes" not in service


def test_bootstrap_script_is_valid_bash_and_its_fedmusk_lines_parse(monkeypatch):
    script = COMPOSE / "bootstrap.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    values = {"${fedmusk[@]}": "fedmusk", "$data": "/data", "$site": "site-1", "${#sites[@]}": "3",
              "$config": "configs/demo.yaml", "${sites[-1]}": "site-3"}  # fmt: skip
    lines = [l.strip() for l in script.read_text().splitlines() if l.strip().startswith('"${fedmusk[@]}"')]
    assert len(lines) >= 5
    seen = set()
    for line in lines:
        for var, value in values.items():
            line = line.replace(var, value)
        command, params = parse_fedmusk(shlex.split(line)[1:], {}, monkeypatch)
        assert_add_site_is_accepted(command, params)
        seen.add(command)
    assert {"synth", "certs init", "certs site-key", "certs add-site", "prepare"} <= seen
    text = script.read_text()
    assert "--public-key" in text and "--generate-key-for-site" not in text, "the demo's hospitals make their keys"


def assert_add_site_is_accepted(command: str, params: dict) -> None:
    """`certs add-site` refuses (at run time) a line with neither --public-key nor --generate-key-for-site."""
    if command == "certs add-site":
        assert (params["public_key"] is not None) != params["generate_key_for_site"], params


# --- systemd -------------------------------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for line in settings.get("Environment", []):
        env.update(token.split("=", 1) for token in shlex.split(line))
    return env


def exec_start_argv(settings: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd runs it: %d is the credentials folder, $VAR splits into words, ${VAR} stays one."""
    (line,) = settings["ExecStart"]
    line = line.replace("%d", "/run/credentials/unit.service")
    line = re.sub(r"\$\{([A-Z_]+)\}", lambda m: shlex.quote(env.get(m.group(1), "")), line)
    line = re.sub(r"\$([A-Z_]+)", lambda m: env.get(m.group(1), ""), line)
    return shlex.split(line)


@pytest.mark.parametrize(
    ("unit", "example", "command"),
    [("fedmusk-client.service", "client.env.example", "client"),
     ("fedmusk-coordinator.service", "coordinator.env.example", "server")],  # fmt: skip
)
def test_systemd_exec_start_with_the_env_example_parses(unit, example, command, monkeypatch):
    settings = unit_settings(SYSTEMD / unit)
    env = {**unit_environment(settings), **active_env_file(SYSTEMD / example)}  # EnvironmentFile= wins
    argv = exec_start_argv(settings, env)
    assert argv[0] == "/opt/fedmusk/venv/bin/fedmusk"
    parsed, params = parse_fedmusk(argv[1:], fedmusk_env(env), monkeypatch)
    assert parsed == command
    unknown = set(env_file(SYSTEMD / example)) - declared_envvars(command) - {"FEDMUSK_SERVER_ARGS"}
    assert not unknown, f"{example} names variables `fedmusk {command}` does not read: {unknown}"
    if command == "server":
        assert params["host"] == "0.0.0.0" and not params["resume"]
        resumed = exec_start_argv(settings, {**env, "FEDMUSK_SERVER_ARGS": "--resume"})
        assert parse_fedmusk(resumed[1:], fedmusk_env(env), monkeypatch)[1]["resume"] is True
    else:
        assert str(params["key"]) == "/run/credentials/unit.service/site.key"
        assert str(params["site_root"]) == env["FEDMUSK_SITE"]


def test_client_unit_may_write_only_the_site_cache_and_its_own_folders():
    settings = unit_settings(SYSTEMD / "fedmusk-client.service")
    site = env_file(SYSTEMD / "client.env.example")["FEDMUSK_SITE"]
    assert settings["ReadWritePaths"] == [f"{site}/.fedmusk"]
    log_file = env_file(SYSTEMD / "client.env.example")["FEDMUSK_LOG_FILE"]
    assert log_file.startswith(f"/var/log/{settings['LogsDirectory'][0]}/")


@pytest.mark.parametrize("unit", ["fedmusk-client.service", "fedmusk-coordinator.service"])
def test_systemd_units_keep_their_hardening(unit):
    settings = unit_settings(SYSTEMD / unit)
    expected = {
        "User": "fedmusk", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "UMask": "0077", "CapabilityBoundingSet": "", "RestartPreventExitStatus": "2",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes", "RestrictRealtime": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    }  # fmt: skip
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{unit}: {key}={value}"
    assert "@system-service" in settings["SystemCallFilter"]
    assert "MemoryDenyWriteExecute" not in settings, "CUDA and PyTorch generate code at run time"
    if unit == "fedmusk-client.service":
        assert settings["Restart"] == ["on-failure"] and settings["PrivateDevices"] == ["no"]
        assert settings["DevicePolicy"] == ["closed"] and any("nvidia" in d for d in settings["DeviceAllow"])
    else:
        assert settings["Restart"] == ["no"], "a restarted federation must be told --resume"
        assert settings["PrivateDevices"] == ["yes"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", ["fedmusk-client.service", "fedmusk-coordinator.service"])
def test_systemd_analyze_verify_accepts_the_units(unit, tmp_path):
    # /opt/fedmusk/venv is not installed on a test machine: verify checks that ExecStart= is executable, so point it
    # at /bin/true; everything else is verified as written.
    text = (SYSTEMD / unit).read_text().replace("ExecStart=/opt/fedmusk/venv/bin/fedmusk", "ExecStart=/bin/true")
    (tmp_path / unit).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    assert unit not in done.stderr, done.stderr  # warnings about our unit (unknown keys, bad values)


# --- the README and every file: commands and secrets ---------------------------------------------------------------


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S)


def commands_in(block: str) -> list[list[str]]:
    """Simple commands of a shell block: continuation lines joined, split at ; && || | & and loop keywords;
    `for v in a b; do ...` binds $v to its first value; leading VAR=value words, sudo and its options dropped."""
    text = re.sub(r"\\\n", " ", block)
    found = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        loop = {}
        if m := re.match(r"for (\w+) in ([^;]+);", line):
            loop[m.group(1)] = m.group(2).split()[0]
        for var, value in loop.items():
            line = line.replace(f"${{{var}}}", value).replace(f"${var}", value)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):
                if words:
                    found.append(words)
                words = []
            elif not words and token in ("do", "then", "else", "done", "fi", "time"):
                continue
            else:
                words.append(token)
    cleaned = []
    for words in found:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words[:1] == ["sudo"]:
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[2:] if words[0] in ("-u", "-g") else words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def fedmusk_lines(words: list[str]) -> list[str] | None:
    """The fedmusk arguments a command runs: `fedmusk ...` itself, or a container of our images."""
    if Path(words[0]).name == "fedmusk":
        return words[1:]
    if words[:2] == ["docker", "run"] or words[:3] == ["docker", "compose", "run"]:
        for i, word in enumerate(words):
            if word.startswith("fedmusk-coordinator") or word == "coordinator":
                return ["server", *words[i + 1:]]
            if word.startswith("fedmusk-hospital") or re.fullmatch(r"site-\d", word):
                return ["client", *words[i + 1:]]
    return None


def test_every_fedmusk_command_in_the_deploy_readme_parses(monkeypatch):
    readme = (DEPLOY / "README.md").read_text()
    lines = [args for block in shell_blocks(readme) for words in commands_in(block)
             if (args := fedmusk_lines(words)) is not None]  # fmt: skip
    assert len(lines) >= 20, "the README's shell blocks should hold the operators' fedmusk commands"
    problems = []
    for args in lines:
        try:
            assert_add_site_is_accepted(*parse_fedmusk(args, {}, monkeypatch))
        except click.UsageError as err:
            problems.append(f"fedmusk {shlex.join(args)}: {err.format_message()}")
    assert not problems, "\n".join(problems)


def test_deploy_readme_links_the_documents_it_relies_on():
    readme = (DEPLOY / "README.md").read_text()
    for doc in ("docs/federation.md", "docs/site-policy.md", "docs/site-data.md"):
        assert f"../{doc}" in readme and (ROOT / doc).is_file()
    for link in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (DEPLOY / link).exists(), f"deploy/README.md links a missing file: {link}"


def deploy_files() -> list[Path]:
    """deploy/'s files as git sees them (never the ignored demo data with its keys), else every file but those."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "deploy", ".dockerignore"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        return [ROOT / p for p in out if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in DEPLOY.rglob("*") if p.is_file() and "data" not in p.relative_to(COMPOSE).parts[:1]]


def test_no_private_key_material_in_deploy():
    files = deploy_files()
    assert any(p.name == "README.md" for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, f"{path} holds something that looks like a private key"
        assert not re.search(r"AAAA[0-9A-Za-z+/]{40,}", text), f"{path} holds key material (an OpenSSH blob)"
