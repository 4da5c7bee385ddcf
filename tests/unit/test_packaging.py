"""Every folder package ships, and the device side never imports the compile tool-chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"agent": "edgefleet.agent", "controller": "edgefleet.controller", "firmware": "edgefleet.firmware",
           "protos": "edgefleet.protos", "common": "edgefleet.common"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "tests" not in rel.parts:
                found.add(".".join([package, *rel.parts]))
    assert sorted(found) == sorted(config["packages"])


def test_agent_import_stays_light() -> None:
    code = (
        "import sys, edgefleet.agent.cli, edgefleet.agent.session, edgefleet.agent.identity\n"
        "import edgefleet.agent.profiler, edgefleet.firmware\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'onnx', 'torch', 'onnxruntime', 'ai_edge_quantizer', 'tensorflow', 'sklearn'} "
        "or m.startswith('edgefleet.controller'))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the agent pulled in: {out}"


def test_controller_imports_nothing_from_the_agent() -> None:
    """What both sides need lives in edgefleet.common; the controller never reaches into the agent."""
    offenders = []
    for path in sorted((ROOT / "controller").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from edgefleet.agent", "import edgefleet.agent")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    # The compiler's local target profiles this machine with the agent's profiler: that is the one
    # sanctioned use (a controller that compiles for itself is also a device of its own class).
    offenders = [o for o in offenders if "edgefleet.agent.profiler" not in o]
    assert offenders == []


def test_common_stays_neutral() -> None:
    """edgefleet.common is imported by both sides, so it imports neither."""
    for path in sorted((ROOT / "common").rglob("*.py")):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("from edgefleet.agent", "import edgefleet.agent",
                                            "from edgefleet.controller", "import edgefleet.controller")), path


def test_compiling_without_retrain_never_imports_torch() -> None:
    """torch is the controller's, and only for --retrain/--student: the compile CLI and API import
    without it, and the train extra pins the CPU build of torch that lies on disk."""
    code = (
        "import sys, edgefleet.controller.cli.compile, edgefleet.controller.compiler.api\n"
        "import edgefleet.controller.compiler.retrain\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'onnx2torch', 'torch_pruning', 'torchvision', 'matplotlib'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the compiler pulled in: {out}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch==2.13.0" in extras["train"]
    assert any(dep.startswith("edgefleet[") and "train" in dep for dep in extras["dev"])
