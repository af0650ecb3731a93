"""The Docker images' assumptions, checked from their files: no image is built here (this machine has
the docker client but no daemon, and the base images' registry is out of its reach; docs/operations.md).

- The cache folders an image names in ENV exist in it and belong to the user it runs as.
- ENTRYPOINT + CMD run a module the image copies, with flags that module has; the image installs the
  project's packages, a Python the project accepts and the torch it pins.
- Every `docker run` line of README.md, docs/ and docker/ runs an image a `docker build` line builds, a
  module and flags that exist, paths inside its mounts, and a server that finds its model: an index built
  on the host records the model's host path, so the line passes `--model` (a path under a mount, or a hub
  name) or serves an index that a `docker run` line of the same page built with a model it mounts too.
- The server's `--model` does serve an index whose recorded model folder is gone (the container's case).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from pathlib import PurePosixPath

import pytest
import yaml

from .support import REPO, synthetic_corpus, build_corpus_index
from .test_readme import help_text

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
COMPOSE = REPO / "docker" / "compose.yaml"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Where the base images' `python` comes from, and its version (the project's floor is pyproject's).
BASE_PYTHON = {"python": None, "nvidia/cuda:*-ubuntu24.04": (3, 12)}  # None: the tag's own version
CACHE_VARS = {"HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME", "XDG_CACHE_HOME", "PIP_CACHE_DIR"}
# docker run's options that take a value (all the docs use); the others are on/off flags
VALUE_OPTIONS = {"-p", "--publish", "-v", "--volume", "-e", "--env", "--gpus", "--user", "-u", "--name", "-w",
                 "--workdir", "--entrypoint", "--network", "--shm-size"}
PATH_FLAGS = {"--index", "--out", "--data", "--model", "--queries"}


# -- reading the files -----------------------------------------------------------------------------

def instructions(path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def env_of(steps) -> dict[str, str]:
    env = {}
    for word, args in steps:
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def commands(run: str) -> list[list[str]]:
    """A RUN line's shell commands, split at &&, || and ;."""
    return [shlex.split(c) for c in re.split(r"\s*(?:&&|\|\||;)\s*", run) if c.strip()]


def within(path: str, folder: str) -> bool:
    return PurePosixPath(folder) == PurePosixPath(path) or PurePosixPath(folder) in PurePosixPath(path).parents


def the_user(steps) -> str:
    users = [args for word, args in steps if word == "USER"]
    assert users, "the image runs as root: no USER"
    assert users[-1] not in ("root", "0")
    return users[-1]


def image_python(steps) -> tuple[int, int]:
    base = next(args for word, args in steps if word == "FROM").split()[0]
    name, _, tag = base.partition(":")
    if name == "python":
        return tuple(map(int, tag.split("-")[0].split(".")[:2]))
    found = [v for pattern, v in BASE_PYTHON.items() if re.fullmatch(pattern.replace("*", ".*"), base)]
    assert found, f"{base}: add its Python version to BASE_PYTHON"
    return found[0]


def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- the images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cache_folders_exist_and_belong_to_the_images_user(dockerfile):
    steps = instructions(dockerfile)
    user = the_user(steps)
    env = env_of(steps)
    caches = {k: v for k, v in env.items() if k in CACHE_VARS and v.startswith("/")}
    assert "HF_HOME" in caches, "the image names no HF_HOME: hub downloads would go to the user's home"
    user_at = max(i for i, (word, args) in enumerate(steps) if word == "USER" and args == user)
    as_root = [c for word, args in steps[:user_at] if word == "RUN" for c in commands(args)]
    made = [c for c in as_root if c[0] == "useradd"]
    assert made and made[-1][-1] == user, f"no useradd of {user}"
    uid = made[-1][made[-1].index("--uid") + 1] if "--uid" in made[-1] else None
    for var, path in caches.items():
        created = [i for i, c in enumerate(as_root) if c[0] == "mkdir" and "-p" in c
                   and any(within(t, path) for t in c[1:] if not t.startswith("-"))]
        assert created, f"{var}={path} is never created (mkdir -p) before USER {user}"

        def owns(c: list[str]) -> bool:
            if c[0] != "chown":
                return False
            args = [a for a in c[1:] if not a.startswith("-")]
            owner, targets = args[0].split(":")[0], args[1:]
            recursive = "-R" in c or "--recursive" in c
            return owner in (user, uid) and any(t == path or (recursive and within(path, t)) for t in targets)

        owned = [i for i, c in enumerate(as_root) if owns(c)]
        assert owned and max(owned) > min(created), f"{var}={path} is not chowned to {user} after it is created"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_entry_point_runs_a_module_the_image_holds(dockerfile, capsys):
    steps = instructions(dockerfile)
    first = dict(reversed(steps))  # each instruction's first occurrence
    entry, cmd = json.loads(first["ENTRYPOINT"]), json.loads(first["CMD"])
    assert entry == ["python", "-m"]
    # what lands in the working directory under its own name: COPY SRC SRC, or COPY SRC... ./
    copied = {src for word, args in steps if word == "COPY"
              for *srcs, dest in [args.split()] for src in srcs if dest in (src, ".", "./")}
    packages = project()["tool"]["setuptools"]["packages"]
    assert set(packages) <= copied, f"packages not copied into the image: {set(packages) - copied}"
    assert {"pyproject.toml", "constraints.txt", project()["project"]["readme"]} <= copied
    module = cmd[0]
    assert module in packages and (REPO / module / "__main__.py").is_file()
    helps = help_text(module)
    assert all(flag in helps for flag in cmd[1:] if flag.startswith("--")), cmd
    port = cmd[cmd.index("--port") + 1]
    assert first["EXPOSE"] == port and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # `python` is the image's: the python image's own, or a venv the image makes and puts first on PATH
    if not next(args for word, args in steps if word == "FROM").startswith("python:"):
        venv = env_of(steps)["PATH"].split(":")[0]
        assert venv.endswith("/bin") and any(c[:3] == ["python3", "-m", "venv"] and c[3] == venv[:-4]
                                             for word, args in steps if word == "RUN" for c in commands(args))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_has_the_python_and_torch_the_project_pins(dockerfile):
    steps = instructions(dockerfile)
    floor = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", project()["project"]["requires-python"]).groups()))
    assert image_python(steps) >= floor
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    installs = [c for word, args in steps if word == "RUN" for c in commands(args) if c[:2] == ["pip", "install"]]
    torch = [c for c in installs if any(a.startswith("torch") for a in c)]
    assert torch and f"torch=={pinned}" in torch[0], torch
    assert installs.index(torch[0]) == 0, "torch goes first, so the project's install keeps that build"
    if dockerfile.name.endswith(".cpu"):
        assert torch[0][torch[0].index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def test_compose_caches_downloads_where_the_image_looks():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        dockerfile = REPO / "docker" / PurePosixPath(service["build"]["dockerfile"]).name
        hf_home = env_of(instructions(dockerfile))["HF_HOME"]
        mounts = {m.group(2): m.group(1) for m in (re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::r[ow])?", v)
                                                  for v in service["volumes"])}
        assert mounts[hf_home] in compose["volumes"], name  # a named volume: it starts as the image's folder
        assert service["command"][0] in project()["tool"]["setuptools"]["packages"]


# -- the docs' docker lines ------------------------------------------------------------------------

def doc_lines() -> dict[str, list[str]]:
    """Each page's shell lines that start with `docker` (continuations joined, trailing comments cut);
    the Dockerfiles' and compose file's comments count as pages."""
    texts = {p.name: p.read_text() for p in PAGES}
    for p in (*DOCKERFILES, COMPOSE):
        texts[p.name] = "\n".join(l.lstrip("# ") for l in p.read_text().splitlines() if l.lstrip().startswith("#"))
    out = {}
    for name, text in texts.items():
        joined = re.sub(r"\\\n\s*", " ", text)
        lines = [re.sub(r"\s+#.*$", "", l.strip()) for l in joined.splitlines() if re.match(r"\s*docker (run|build) ", l)]
        out[name] = [l for l in lines if l]
    return out


def parse_run(line: str) -> dict:
    words = shlex.split(line)[2:]
    opts: dict[str, list[str]] = {}
    while words[0].startswith("-"):
        flag = words.pop(0)
        opts.setdefault(flag, []).append(words.pop(0) if flag in VALUE_OPTIONS else "")
    image, module, *rest = words
    command = rest.pop(0) if module == "indexer" else None
    flags = {rest[i]: rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else ""
             for i in range(len(rest)) if rest[i].startswith("--")}
    mounts = {}
    for v in opts.get("-v", []) + opts.get("--volume", []):
        host, container, *mode = v.split(":")
        mounts[container] = (host, mode == ["ro"])
    return {"line": line, "image": image, "module": module, "command": command, "flags": flags, "mounts": mounts,
            "publish": opts.get("-p", []) + opts.get("--publish", [])}


def mount_of(run: dict, path: str):
    found = [c for c in run["mounts"] if within(path, c)]
    return max(found, key=len) if found else None


def test_docs_docker_lines_run_what_the_images_hold():
    pages = doc_lines()
    builds = {}
    for line in (l for ls in pages.values() for l in ls if l.startswith("docker build")):
        words = shlex.split(line)
        builds[words[words.index("-t") + 1]] = words[words.index("-f") + 1]
        assert (REPO / words[words.index("-f") + 1]).is_file() and words[-1] == ".", line
    runs = {page: [parse_run(l) for l in ls if l.startswith("docker run")] for page, ls in pages.items()}
    assert sum(map(len, runs.values())) >= 5 and runs["README.md"]
    helps = {}
    for page, page_runs in runs.items():
        for run in page_runs:
            where = f"{page}: {run['line']}"
            assert run["image"] in builds, where
            assert run["module"] in ("api", "indexer"), where
            key = run["command"] or "api"
            helps.setdefault(key, help_text(key))
            assert all(flag in helps[key] for flag in run["flags"]), where
            for flag, value in run["flags"].items():
                if flag in PATH_FLAGS and value.startswith("/"):
                    assert mount_of(run, value), f"{where}: {value} is in no mounted folder"
            for flag in ("--out", "--index") if run["command"] in ("build", "append") else ():
                if flag in run["flags"]:
                    assert not run["mounts"][mount_of(run, run["flags"][flag])][1], f"{where}: written to a :ro mount"
            if run["module"] == "api":
                assert_serves(run, page_runs, where)


def assert_serves(run: dict, page_runs: list[dict], where: str) -> None:
    flags = run["flags"]
    if run["publish"]:  # reachable from the host: every interface, the published port
        assert flags.get("--host") == "0.0.0.0", where
        assert all(p.split(":")[-1] == flags.get("--port", "8000") for p in run["publish"]), where
    if "--model" in flags:
        model, mounts = flags["--model"], run["mounts"]
    else:  # the index must have been built in a container, with a model this line finds at the same path
        built = [b for b in page_runs if b["command"] == "build" and b["flags"].get("--out") == flags["--index"]]
        assert built, f"{where}: an index built on the host records the model's host path: pass --model"
        model = built[0]["flags"]["--model"]
        at = mount_of(built[0], model)
        mounts = {at: built[0]["mounts"][at]} if at else {}
        assert not at or run["mounts"].get(at, ("",))[0] == mounts[at][0], f"{where}: {model} is not mounted here"
    assert not model.startswith("/") or mount_of({"mounts": mounts}, model), f"{where}: {model} is in no mount"


# -- the server with --model -----------------------------------------------------------------------

def test_an_index_whose_model_folder_moved_is_served_with_model(tmp_path, gpt2_dir, capsys):
    """As in a container: the manifest's model folder does not exist there; `--model` names the mounted copy."""
    from fastapi.testclient import TestClient

    from api import create_app
    from api.__main__ import main as api_main
    from indexer.store import read_manifest
    host_model = tmp_path / "host" / "my-model"
    shutil.copytree(gpt2_dir, host_model)
    docs = synthetic_corpus(12, seed=7)
    index = build_corpus_index(tmp_path / "host", str(host_model), docs)
    assert read_manifest(index).model.name_or_path == str(host_model.resolve())
    mounted = tmp_path / "container" / "models" / "my-model"
    mounted.parent.mkdir(parents=True)
    host_model.rename(mounted)
    assert api_main(["--index", str(index)]) == 2  # the recorded folder is gone: one line, no traceback
    assert "error:" in capsys.readouterr().err
    with TestClient(create_app(index, model=str(mounted))) as client:
        r = client.post("/attribute", json={"prompt": "", "response": docs[4]["text"], "k": 3})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == docs[4]["id"]
