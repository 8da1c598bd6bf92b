"""Reading the operators' files in deploy/ for the deployment tests: every ``fedmusk ...`` line parsed by the real
CLI, env examples, and the instructions of our Dockerfiles."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedmusk.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
IMAGE_DOCKERFILES = {"coordinator": DOCKER / "coordinator.Dockerfile", "hospital": DOCKER / "hospital.Dockerfile"}


# --- parsing command lines with the real CLI -----------------------------------------------------------------------


def parse_fedmusk(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """Parse ``fedmusk ARGS`` as the installed command does, with ``env`` as the only FEDMUSK_* variables.

    Returns (the command's path, e.g. 'certs add-site', its parameters). Raises click.UsageError (a missing option,
    an unknown flag, a bad value) exactly where the real command would refuse the line."""
    for name in [k for k in os.environ if k.startswith("FEDMUSK_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = typer.main.get_command(app)
    ctx = command.make_context("fedmusk", [], resilient_parsing=True)  # the group has no options of its own
    path, rest = [], list(args)
    while isinstance(command, click.Group):
        if not rest:
            raise click.UsageError(f"`fedmusk {' '.join(path)}` needs a command")
        name, *rest = rest
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no such command: fedmusk {' '.join([*path, name])}")
        path.append(name)
        command = sub
        if isinstance(command, click.Group):
            ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
    sub_ctx = command.make_context(" ".join(["fedmusk", *path]), rest, parent=ctx, resilient_parsing=False)
    return " ".join(path), sub_ctx.params


def declared_envvars(command_path: str) -> set[str]:
    """The environment variables a fedmusk command reads, as its options declare them."""
    command = typer.main.get_command(app)
    for name in command_path.split():
        command = command.commands[name]
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else (envvar or []))
    return names


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env example; a commented-out assignment counts too (it names a real variable)."""
    values = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line.strip()):
            values[m.group(1)] = m.group(2).strip()
    return values


def active_env_file(path: Path) -> dict[str, str]:
    """Only the assignments that are in force (not commented out): what systemd reads."""
    return {k: v for k, v in env_file(path).items() if f"\n{k}=" in "\n" + path.read_text()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV of the image's final stage."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            env = {}
        elif word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_entrypoint(path: Path) -> list[str]:
    entry = [rest for word, rest in dockerfile_instructions(path) if word == "ENTRYPOINT"]
    return yaml.safe_load(entry[-1])  # exec form: a JSON list


def fedmusk_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("FEDMUSK_")}
