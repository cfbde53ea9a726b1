"""The container image, as far as it can be checked without a container engine.

The Dockerfile's RUN steps only call scripts/system-packages, scripts/build-wheels and
scripts/install-wheels. Here the same scripts build the same wheels and install them,
offline, into a new environment like the image's, whose `pail` entry point then runs; the
rest checks the Dockerfile against the scripts, pyproject.toml, the pins and
.dockerignore, so that they cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
CONSTRAINTS = ROOT / "constraints" / "image.txt"

# Building pyfuse3 takes about a minute on 2 cores, downloading the wheels a little more.
pytestmark = pytest.mark.timeout(900)


# --- the Dockerfile, parsed ---------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    flags: list[str]
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: continuation lines joined, comments dropped
    (Docker drops comment lines inside a continued instruction too)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            flags = [w for w in args.split() if w.startswith("--")]
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], flags=flags, name=name, instructions=[]))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(ROOT / "Dockerfile")


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def stage_args(stage: Stage) -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in stage.all("ARG"))


# --- pins ---------------------------------------------------------------------------

def read_constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints/image.txt: not an exact pin: {line!r}"
        name = canonicalize_name(name)
        assert name not in pins, f"constraints/image.txt: {name} twice"
        pins[name] = version
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def apt_packages(*args: str) -> list[str]:
    out = subprocess.run([SCRIPTS / "system-packages", "--list", *args],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


# --- the image's environment, built once for the module -------------------------------

@dataclass
class ImageEnvironment:
    wheels: Path
    venv: Path
    workdir: Path  # not the checkout: nothing may be imported from the source tree

    def run(self, *command: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in command], cwd=self.workdir, capture_output=True,
                              text=True, timeout=120, env=offline_env(), check=False)


def offline_env() -> dict[str, str]:
    """This machine's pip settings (extra indexes and wheel folders) left out, so that
    an install succeeds from the wheel folder alone or not at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def run_script(command: list[str | Path], env: dict[str, str]) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


@dataclass
class WheelBuild:
    """scripts/build-wheels running in the background."""

    process: subprocess.Popen
    base: Path
    wheels: Path
    output: Path

    def wait(self) -> None:
        returncode = self.process.wait()
        output = self.output.read_text(errors="replace")
        assert returncode == 0, f"scripts/build-wheels {self.wheels} failed ({returncode}):\n{output[-8000:]}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the script, and the pip and gcc it runs
            self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def wheel_build(request, tmp_path_factory):
    """The build of the image's wheels, started with the module's first test when any
    test of this run needs it. It is the same build, from nothing, as in the image_env
    fixture that waits for it; starting it early lets it compile pyfuse3 (on one core)
    while the tests before it run, the arm64 check above all, which spends half a minute
    asking the index."""
    if not any("image_env" in item.fixturenames for item in request.session.items
               if getattr(item, "module", None) is request.module):
        yield None
        return
    base = tmp_path_factory.mktemp("image")
    wheels, output = base / "wheels", base / "build-wheels.log"
    # The interpreter running the tests: the same Python version as the image's.
    env = {**os.environ, "PYTHON": sys.executable}
    with open(output, "wb") as log:
        process = subprocess.Popen([str(SCRIPTS / "build-wheels"), str(wheels)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    build = WheelBuild(process=process, base=base, wheels=wheels, output=output)
    try:
        yield build
    finally:
        build.stop()


@pytest.fixture(scope="module")
def image_env(wheel_build: WheelBuild) -> ImageEnvironment:
    wheel_build.wait()
    base, wheels, venv = wheel_build.base, wheel_build.wheels, wheel_build.base / "opt-pail"
    run_script([SCRIPTS / "install-wheels", wheels, venv], {**offline_env(), "PYTHON": sys.executable})
    workdir = base / "work"
    workdir.mkdir()
    return ImageEnvironment(wheels=wheels, venv=venv, workdir=workdir)


# --- the Dockerfile -----------------------------------------------------------------

def test_entry_point_is_pail_and_the_default_command_is_csi(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    assert [exec_form(a) for a in final.all("ENTRYPOINT")] == [["pail"]]
    (cmd,) = [exec_form(a) for a in final.all("CMD")]
    assert cmd[0] == "csi"
    # The node plugin mounts FUSE file systems: the image runs as root, said explicitly.
    assert final.all("USER") in ([], ["root"])
    assert any(re.match(r"PATH=/opt/pail/bin:", a) for a in final.all("ENV"))


def test_run_steps_call_the_project_scripts(dockerfile):
    _, stages = dockerfile
    assert len(stages) == 2, "a builder stage and the final stage"
    builder, final = stages
    for stage in stages:
        for run in stage.all("RUN"):
            command = re.sub(r"^(--\S+\s+)+", "", run)
            # Installing by hand would bypass the lists and pins the tests use.
            for bypass in ("apt-get install", "apt install", "pip install", "pip wheel", "pip3 "):
                assert bypass not in command, f"RUN installs by hand ({bypass!r}): {run}"
            assert re.search(r"scripts/(system-packages|build-wheels|install-wheels)\b", command), run

    runs = " ; ".join(builder.all("RUN"))
    assert re.search(r"scripts/system-packages --pinned build\b", runs)
    assert re.search(r"scripts/build-wheels /wheels\b", runs)
    assert re.search(r"scripts/install-wheels /wheels /opt/pail\b", runs)
    # The builder compiles pyfuse3 on the target platform, never on the build host's.
    assert not any(f.startswith("--platform") for s in stages for f in s.flags)

    (runtime_run,) = final.all("RUN")
    assert re.search(r"system-packages --pinned runtime\b", runtime_run)
    assert "build" not in runtime_run.split("system-packages", 1)[1].split("&&")[0]
    assert "rm -rf /var/lib/apt/lists/*" in runtime_run
    # Nothing but the environment crosses from the builder: no compiler, wheels or caches.
    copies = final.all("COPY")
    assert copies == ["--from=builder /opt/pail /opt/pail"]


def test_both_stages_share_an_exactly_tagged_bookworm_python(dockerfile):
    global_args, stages = dockerfile
    assert [s.base for s in stages] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    match = re.fullmatch(r"python:(3)\.(\d+)\.(\d+)-slim-bookworm(@sha256:[0-9a-f]{64})?",
                         global_args["BASE_IMAGE"])
    assert match, global_args["BASE_IMAGE"]
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(f"{match[1]}.{match[2]}.{match[3]}")
    # pyfuse3's wheel is built for the tests' interpreter: the same minor version.
    assert (int(match[1]), int(match[2])) == sys.version_info[:2]


def test_labels_carry_the_version_of_pyproject(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    args = stage_args(final)
    assert args["VERSION"] == pyproject()["project"]["version"]
    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "source", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${REVISION}"' in labels
    assert "REVISION" in args and "SOURCE" in args


def test_build_context_lets_through_what_the_dockerfile_uses(dockerfile):
    _, stages = dockerfile
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    used: set[str] = set()
    for stage in stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue
            used.update(word.split("/")[0] for word in shlex.split(copy)[:-1])
        for run in stage.all("RUN"):
            used.update(m.split("/")[0] for m in re.findall(r"type=bind,source=([^,\s]+)", run))
    assert used and used <= allowed, f"copied or mounted but ignored: {sorted(used - allowed)}"

    # build-wheels builds Pail from these files; the builder stage must have all of them.
    build_wheels = (SCRIPTS / "build-wheels").read_text()
    sources = set(re.findall(r'"\$root/([^"]+)"', build_wheels.split("cp -R", 1)[1].splitlines()[0]))
    assert sources == {"pyproject.toml", "README.md", "driver", "csi"}, sources
    assert sources <= used


# --- pins ---------------------------------------------------------------------------

def test_constraints_pin_every_declared_runtime_dependency():
    pins = read_constraints()
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency in pyproject.toml but not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy pyproject.toml's {dependency!r}")


def test_apt_pins_are_bookworms_as_installed_here():
    """The image installs fuse3 and libfuse3 at pinned versions; setup installs bookworm's
    current ones on this Debian 12 machine. When they differ, Debian has moved on and the
    image's pins (scripts/system-packages) need a look before its build breaks."""
    runtime = dict(p.partition("=")[::2] for p in apt_packages("--pinned", "runtime"))
    build = dict(p.partition("=")[::2] for p in apt_packages("--pinned", "build"))
    assert runtime["fuse3"] and runtime["libfuse3-3"], "the image's FUSE packages are pinned"
    assert build["libfuse3-dev"] == runtime["libfuse3-3"], "pyfuse3 is built against the library it runs with"
    # Unpinned for setup: a developer's machine follows bookworm's point releases.
    assert all("=" not in p for p in apt_packages("build", "runtime", "test"))
    for package, version in {**build, **runtime}.items():
        if not version:
            continue
        installed = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                   capture_output=True, text=True, check=False).stdout
        assert installed == version, (
            f"{package}: bookworm's {installed or 'nothing'} is installed here, the image pins {version}")


def test_every_pinned_wheel_exists_for_arm64(tmp_path):
    """The arm64 image is built under emulation with binary wheels only (but pyfuse3's):
    ask the index for each pinned package's aarch64 wheel for Python 3.11 on glibc 2.36
    (bookworm), without building or installing anything."""
    pins = read_constraints()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()
                                    if name != "pyfuse3"))
    platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)] + ["manylinux2014_aarch64"]
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
         "--ignore-installed", "--no-deps", "--only-binary", ":all:", "--implementation", "cp",
         "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}",
         *[arg for p in platforms for arg in ("--platform", p)],
         "--target", str(tmp_path / "target"), "--report", str(report), "-r", str(requirements)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    chosen = {canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[1]
              for item in json.loads(report.read_text())["install"]}
    assert set(chosen) == set(pins) - {"pyfuse3"}
    for name, filename in chosen.items():
        assert filename.endswith(".whl") and ("aarch64" in filename or filename.endswith("-any.whl")), (name, filename)


# --- the built environment ----------------------------------------------------------

def test_wheels_are_pail_a_compiled_pyfuse3_and_the_pinned_dependencies(image_env):
    wheels = sorted(p.name for p in image_env.wheels.glob("*.whl"))
    names = {canonicalize_name(w.split("-")[0]) for w in wheels}
    assert "pail-csi" in names
    (pyfuse3,) = [w for w in wheels if w.startswith("pyfuse3-")]
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert re.fullmatch(rf"pyfuse3-{read_constraints()['pyfuse3']}-{tag}-{tag}-linux_\w+\.whl", pyfuse3), pyfuse3
    assert names - {"pail-csi"} <= set(read_constraints())


def test_image_environment_holds_exactly_the_pinned_packages(image_env):
    listing = image_env.run(image_env.venv / "bin" / "python", "-c",
                            "import importlib.metadata as m, json;"
                            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    assert listing.returncode == 0, listing.stderr
    installed = {canonicalize_name(k): v for k, v in json.loads(listing.stdout).items()}
    assert installed.pop("pail-csi") == pyproject()["project"]["version"]
    # No pip, so nothing installs anything in the image at run time.
    assert "pip" not in installed and not (image_env.venv / "bin" / "pip").exists()
    pins = read_constraints()
    wrong = {n: v for n, v in installed.items() if pins.get(n) != v}
    assert not wrong, ("pin these in constraints/image.txt (the image would get them unpinned):\n"
                       + "\n".join(f"{n}=={v}" for n, v in sorted(wrong.items())))


def test_every_module_of_pail_imports_from_the_installed_wheels(image_env):
    """`--help` loads little; importing every module proves the dependencies are all
    there and pyfuse3's extension loads against this machine's libfuse3."""
    script = (
        "import importlib, pkgutil, driver, csi, pyfuse3\n"
        "assert '/site-packages/' in driver.__file__, driver.__file__\n"
        "names = [m.name for p in (driver, csi)\n"
        "         for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        "for name in names:\n"
        "    if not name.endswith('__main__'):\n"
        "        importlib.import_module(name)\n"
        "print(len(names), pyfuse3.__file__)\n")
    result = image_env.run(image_env.venv / "bin" / "python", "-c", script)
    assert result.returncode == 0, result.stderr
    count, extension = result.stdout.split()
    assert int(count) > 20 and extension.endswith(".so")


@pytest.mark.parametrize(("args", "expected"), [
    (["csi", "--help"], ["node", "controller"]),
    (["csi", "node", "--help"], ["--endpoint", "--node-id", "--state-dir", "--kubelet-dir"]),
    (["csi", "controller", "--help"], ["--endpoint", "--s3-endpoint-url"]),
    (["--version"], [f"pail {pyproject()['project']['version']}"]),
])
def test_entry_point_answers(image_env, args, expected):
    result = image_env.run(image_env.venv / "bin" / "pail", *args)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, (text, result.stdout)
