"""The agent's local commands through click's CliRunner."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from edgefleet.agent.cli import cli


def test_profile_json_matches_proc_cpuinfo(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["profile", "--json", "--no-microbench", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output[result.output.index("{"):])
    flags = set(re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())  # type: ignore[union-attr]
    assert ("avx2" in profile["cpu"]["isa_features"]) == ("avx2" in flags)
    assert profile["hardware_class"] and profile["cpu"]["logical_cores"] >= 1
    human = CliRunner().invoke(cli, ["profile", "--no-microbench", "--hardware-class", "arm64-dotprod"])
    assert human.exit_code == 0 and "class        arm64-dotprod" in human.output


def test_local_commands_explain_a_missing_agent_or_identity(tmp_path: Path) -> None:
    status = CliRunner().invoke(cli, ["status", "--state-dir", str(tmp_path)])
    assert status.exit_code == 2 and "no agent is serving" in status.output
    ident = CliRunner().invoke(cli, ["identity", "--state-dir", str(tmp_path)])
    assert ident.exit_code == 2 and "not enrolled" in ident.output
    run = CliRunner().invoke(cli, ["run", "--state-dir", str(tmp_path), "--workload", "lots", "--no-microbench"])
    assert run.exit_code == 2 and "golden:RATE/s" in run.output
    run = CliRunner().invoke(cli, ["run", "--state-dir", str(tmp_path), "--no-microbench", "--local-api", "unix"])
    assert run.exit_code == 2 and "pass --token" in run.output
