"""Docker testbed files: docker-compose.yml is valid Compose, and everything it and the Dockerfile run exists.

No Docker engine runs here, so the checks are static (schema, files, console scripts, modules, CLI
options) plus a run of the UE entrypoint script with a stub client (inside a network namespace where
permitted, to see its tc shaping).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_NAME = "shared/data/compose-spec.schema.json"
# CI clones the repo with ../shared beside it; a git worktree nested deeper finds it further up.
SCHEMA = next((p / SCHEMA_NAME for p in REPO.parents if (p / SCHEMA_NAME).is_file()), REPO.parent / SCHEMA_NAME)
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "testbed/docker/ue-entrypoint.sh"
HEALTHCHECK_MODULE = "edge_server.healthcheck"  # the compose healthcheck runs `python -m` this
BASE_IMAGE_BINARIES = {"sh", "python", "python3", "tc", "ip"}  # python:3.11-slim + iproute2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context (not --from other stages)."""
    result = []
    for word, args in _dockerfile_instructions():
        if word not in ("COPY", "ADD"):
            continue
        parts = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        result.append((paths[:-1], paths[-1]))
    return result


def _module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.exists():
            return candidate
    return None


def _commands(compose: dict) -> list[tuple[str, list[str]]]:
    """Every argv the compose file and the Dockerfile run, labelled by where it comes from."""
    cmds = []
    for name, svc in compose["services"].items():
        for key in ("entrypoint", "command"):
            if key in svc:
                v = svc[key]
                cmds.append((f"{name}.{key}", v if isinstance(v, list) else shlex.split(v)))
        test = svc.get("healthcheck", {}).get("test")
        if test:
            argv = test if isinstance(test, list) else ["CMD-SHELL", test]
            if argv[0] == "CMD-SHELL":
                argv = shlex.split(argv[1])
            elif argv[0] == "CMD":
                argv = argv[1:]
            cmds.append((f"{name}.healthcheck", argv))
    for word, args in _dockerfile_instructions():
        if word in ("CMD", "ENTRYPOINT"):
            cmds.append((f"Dockerfile {word}", json.loads(args) if args.startswith("[") else shlex.split(args)))
    return cmds


# -- compose file ----------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec_schema(compose):
    # A missing schema is a broken checkout, not a reason to skip: CI always has ../shared.
    assert SCHEMA.is_file(), f"Compose Specification schema not found at {SCHEMA} (nor in any parent's shared/)"
    import jsonschema

    jsonschema.validate(compose, json.loads(SCHEMA.read_text()))


def test_compose_has_the_testbed_shape(compose):
    edge, ue = compose["services"]["edge"], compose["services"]["ue"]
    assert edge["command"][:2] == ["coinfer-edge", "serve"]
    assert edge["command"][2:6] == ["--host", "0.0.0.0", "--port", "50051"]
    # authenticated, over TLS, with the run's throwaway credentials made before the edge starts
    opts = dict(zip(edge["command"][6::2], edge["command"][7::2]))
    assert opts == {"--auth-tokens": "/credentials/tokens.json", "--tls-cert": "/credentials/server.pem",
                    "--tls-key": "/credentials/server.key", "--data-port": "50052"}
    assert "50052" in edge["expose"]  # the data channel
    creds = compose["services"]["credentials"]
    assert creds["command"][:3] == ["python", "-m", "testbed.credentials"]
    cargs = dict(zip(creds["command"][3::2], creds["command"][4::2]))
    assert cargs["--out"] == "/credentials" and "edge" in cargs["--hosts"].split(",")
    assert cargs["--count"] == ue["deploy"]["replicas"]  # one token per UE replica
    assert edge["depends_on"]["credentials"]["condition"] == "service_completed_successfully"
    assert "--insecure" not in edge["command"]
    assert edge["healthcheck"]["test"][-2:] == ["--tls-ca", "/credentials/ca.pem"]
    assert ue["environment"]["TLS_CA"] == "/credentials/ca.pem"
    assert ue["environment"]["TOKENS_DIR"] == "/credentials/tokens"
    for svc in (creds, edge, ue):
        assert any(v.split(":")[:2] == ["credentials", "/credentials"] for v in svc["volumes"])
    assert edge["healthcheck"]["test"][:4] == ["CMD", "python", "-m", HEALTHCHECK_MODULE]
    assert ue["depends_on"]["edge"]["condition"] == "service_healthy"
    assert "NET_ADMIN" in ue["cap_add"]
    assert "replicas" in ue["deploy"] and "cpus" in ue["deploy"]["resources"]["limits"]
    assert {"UPLINK_MBPS", "RTT_MS", "MODEL", "POLICY", "REQUESTS"} <= set(ue["environment"])
    assert any(v.split(":")[1] == "/results" for v in ue["volumes"])
    assert ue["volumes"][0].split(":")[0] in compose["volumes"]
    # Every service runs the image this Dockerfile builds.
    for svc in compose["services"].values():
        assert svc["build"]["context"] == "." and svc["build"]["dockerfile"] == "Dockerfile"


def test_console_scripts_used_are_declared_and_their_modules_exist(compose, pyproject):
    scripts = pyproject["project"]["scripts"]
    used = {argv[0] for _, argv in _commands(compose) if argv[0].startswith("coinfer-")}
    used |= set(re.findall(r"COINFER_UE:-(coinfer-[a-z]+)", ENTRYPOINT.read_text()))
    assert used >= {"coinfer-edge", "coinfer-ue"}
    for name in used:
        assert name in scripts, f"{name} is run by the Docker testbed but not in [project.scripts]"
        module, _, func = scripts[name].partition(":")
        path = _module_file(module)
        assert path is not None, f"{name} -> {module}: no such module file"
        assert re.search(rf"^def {func}\(", path.read_text(), re.M), f"{name} -> {path} has no {func}()"


def test_every_command_run_exists(compose):
    copied_to = {dest for _, dest in _copies()}
    for where, argv in _commands(compose):
        prog = argv[0]
        if prog.startswith("coinfer-"):
            continue  # checked against [project.scripts] above
        if prog in ("python", "python3") and argv[1:2] == ["-m"]:
            module = argv[2]
            if module == HEALTHCHECK_MODULE and _module_file(module) is None:
                pytest.skip(
                    f"{where}: {REPO / 'edge_server/healthcheck.py'} does not exist yet "
                    "(the runtime provides it: exit 0 iff grpc.health.v1 answers SERVING)"
                )
            assert _module_file(module) is not None, f"{where}: python -m {module}: no such module"
        elif prog.startswith("/"):
            assert prog in copied_to, f"{where}: {prog} is not put into the image by a COPY"
        else:
            assert prog in BASE_IMAGE_BINARIES, f"{where}: {prog} is not known to be in the image"


def test_healthcheck_module_speaks_the_compose_arguments(compose):
    path = _module_file(HEALTHCHECK_MODULE)
    if path is None:
        pytest.skip(
            f"{REPO / 'edge_server/healthcheck.py'} does not exist yet (expected: "
            "`python -m edge_server.healthcheck --address HOST:PORT --timeout S`, exit 0 iff SERVING)"
        )
    argv = compose["services"]["edge"]["healthcheck"]["test"]
    res = subprocess.run(
        [sys.executable, "-m", HEALTHCHECK_MODULE, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    for opt in (a for a in argv if a.startswith("--")):
        assert opt in res.stdout, f"{HEALTHCHECK_MODULE} has no {opt} option"


def _subcommand_help(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``module.main(argv)`` in this process (a subprocess paid ~6 s of torch import for argparse's help):
    its exit code and what it printed."""
    import contextlib
    import importlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = importlib.import_module(module).main(argv)
        except SystemExit as e:  # argparse's --help and usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def test_edge_and_ue_subcommands_accept_the_options_used(compose):
    res = _subcommand_help("edge_server.cli", ["serve", "--help"])
    assert res.returncode == 0, res.stderr
    for opt in (a for a in compose["services"]["edge"]["command"] if a.startswith("--")):
        assert opt in res.stdout, f"coinfer-edge serve has no {opt}"
    script = ENTRYPOINT.read_text()
    used = set(re.findall(r"(--[a-z][a-z-]+) \"", script.split("set -- run", 1)[1].split("log ", 1)[0]))
    assert used == {"--server", "--model", "--policy", "--requests", "--json", "--tls-ca"}
    res = _subcommand_help("ue_client.cli", ["run", "--help"])
    if res.returncode != 0 and "invalid choice: 'run'" in res.stderr:
        pytest.skip(
            "`coinfer-ue run` is not implemented yet (ue_client/cli.py); the UE entrypoint needs it with "
            + ", ".join(sorted(used))
        )
    assert res.returncode == 0, res.stderr
    for opt in used:
        assert opt in res.stdout, f"coinfer-ue run has no {opt}"
    choices = re.search(r"--policy \{([^}]*)\}", res.stdout)
    if choices:  # the default POLICY of the compose file is one the client accepts
        default = re.fullmatch(r"\$\{POLICY:-(\w+)\}", compose["services"]["ue"]["environment"]["POLICY"])
        assert default and default.group(1) in choices.group(1).split(","), choices.group(0)


# -- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist():
    missing = [src for sources, _ in _copies() for src in sources if not list(REPO.glob(src.rstrip("/")))]
    if missing == ["README.md"]:
        pytest.skip(
            "README.md does not exist yet: the Dockerfile copies it because pyproject.toml names it "
            "as the readme (`pip install .` fails without it)"
        )
    assert missing == []


def test_dockerfile_installs_cpu_torch_then_the_project(pyproject):
    runs = [args for word, args in _dockerfile_instructions() if word == "RUN"]
    torch_idx = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/cpu" in r)
    project_idx = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_idx < project_idx
    pins = dict(re.findall(r"(torch|torchvision)==([\w.]+)", runs[torch_idx]))
    deps = dict(re.findall(r"^(torch|torchvision)==([\w.]+)$", "\n".join(pyproject["project"]["dependencies"]), re.M))
    assert pins == deps == {"torch": "2.13.0", "torchvision": "0.28.0"}
    # Every package setuptools installs is copied into the image.
    copied = {s.rstrip("/") for sources, _ in _copies() for s in sources}
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


# -- UE entrypoint ---------------------------------------------------------------------------------


def test_entrypoint_is_an_executable_posix_script():
    mode = ENTRYPOINT.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXOTH, "ue-entrypoint.sh must be executable"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    res = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    for module in re.findall(r"python -m ([\w.]+)", ENTRYPOINT.read_text()):
        assert _module_file(module) is not None, f"entrypoint runs python -m {module}: no such module"


def _run_entrypoint(tmp_path: Path, prefix: list[str], **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the entrypoint with a stub client that records its arguments (and the tc setup it sees)."""
    stub = tmp_path / "stub-ue"
    stub.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUT"\ntc qdisc show dev "$SHAPE_DEV" > "$STUB_OUT.tc" 2>&1 || true\n'
        'printf "%s" "${COINFER_TOKEN:-}" > "$STUB_OUT.token"\n'
    )
    stub.chmod(0o755)
    full_env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "MODEL": "torchvision:resnet18",
        "REQUESTS": "3",
        "RESULTS_DIR": str(tmp_path / "results"),
        "HOSTNAME": "ue-test",
        "COINFER_UE": str(stub),
        "STUB_OUT": str(tmp_path / "args"),
        **env,
    }
    res = subprocess.run([*prefix, str(ENTRYPOINT)], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else []
    return res, args


def _no_relay_left(server: str) -> bool:
    for p in psutil.process_iter(["cmdline"]):
        if server in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
            return False
    return True


def test_entrypoint_falls_back_to_the_relay_without_tc(tmp_path):
    server = f"edge-{uuid.uuid4().hex[:8]}:50051"
    res, args = _run_entrypoint(tmp_path, [], SERVER=server, UPLINK_MBPS="20", RTT_MS="40", SHAPE_DEV="cfr-no-such-dev")
    assert res.returncode == 0, res.stderr
    assert "tc not permitted" in res.stderr
    opts = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "run"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", opts["--server"]), args
    assert opts["--model"] == "torchvision:resnet18" and opts["--policy"] == "auto"
    assert opts["--requests"] == "3" and opts["--json"] == str(tmp_path / "results/ue-ue-test.json")
    assert opts["--data-channel"] == "off"  # the relay carries the gRPC port only: weights in-stream
    assert _no_relay_left(server), "the relay must stop with the entrypoint"


def test_entrypoint_claims_one_token_per_ue_and_connects_with_tls(tmp_path):
    from testbed.credentials import make_credentials

    creds = make_credentials(tmp_path / "creds", ["ue-1", "ue-2"], hosts=["edge"])
    env = {"SERVER": "edge:50051", "UPLINK_MBPS": "0", "RTT_MS": "0", "SHAPE_DEV": "cfr-no-such-dev",
           "TOKENS_DIR": str(creds.directory / "tokens"), "TLS_CA": str(creds.ca_cert)}
    claimed = []
    for i in range(2):
        run_dir = tmp_path / f"ue{i}"
        run_dir.mkdir()
        res, args = _run_entrypoint(run_dir, [], **env)
        assert res.returncode == 0, res.stderr
        opts = dict(zip(args[1::2], args[2::2]))
        assert opts["--tls-ca"] == str(creds.ca_cert) and opts["--server"] == "edge:50051"
        token = (run_dir / "args.token").read_text()
        assert token not in args and token not in res.stderr  # the token travels in the environment only
        claimed.append(token)
    assert sorted(claimed) == sorted(creds.tokens.values())  # each UE its own tenant
    (tmp_path / "ue2").mkdir()
    res, _ = _run_entrypoint(tmp_path / "ue2", [], **env)
    assert res.returncode == 1 and "no unclaimed token" in res.stderr


def test_entrypoint_shapes_its_uplink_with_tc_in_a_namespace(tmp_path):
    from testbed.netns import NetnsTestbed, detect_mode

    mode = detect_mode()
    if mode.network != "netns+tc":
        pytest.skip(f"needs network namespaces + tc: {mode.describe()}")
    server = f"edge-{uuid.uuid4().hex[:8]}:50051"
    with NetnsTestbed() as tb:
        ue = tb.add_ue()
        res, args = _run_entrypoint(
            tmp_path,
            ["ip", "netns", "exec", ue.netns],
            SERVER=server,
            UPLINK_MBPS="20",
            RTT_MS="40",
            SHAPE_DEV=ue.ue_if,
        )
    assert res.returncode == 0, res.stderr
    qdiscs = (tmp_path / "args.tc").read_text()
    assert re.search(r"tbf .*rate 209[01]\dKbit", qdiscs), qdiscs  # 20 Mbit/s goodput + frame overhead
    opts = dict(zip(args[1::2], args[2::2]))
    if mode.netem:
        assert "netem" in qdiscs and opts["--server"] == server
    else:
        assert "no netem" in res.stderr
        assert re.fullmatch(r"127\.0\.0\.1:\d+", opts["--server"]), args  # delay from the relay
    assert _no_relay_left(server)
