"""User errors stop the run before training with one clear line and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.run import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ("lora-rank=0", "'lora-rank' = 0"),
        ("num-rounds=-2", "'num-rounds' = -2"),
        ("no-such-key=1", "'no-such-key' = 1: unknown key"),
        ("dataset='missing.csv'", "no such file"),
        ("model='./models/absent'", "'model' = "),
        ("num-sites=5000", "'num-sites' = 5000"),
        ("delta=1.5", "'delta' = 1.5: use 0 < delta < 1"),
        ("target-epsilon=0", "'target-epsilon' = 0.0"),
        ("max-grad-norm=0", "'max-grad-norm' = 0.0"),
        ("target-epsilon=0.05", "smallest workable setting is target-epsilon >= 0."),
        ("target-epsilon=0.3 noise-multiplier=1.0", "smallest workable setting is target-epsilon >= 12."),
    ],
)
def test_config_errors_print_one_line(overrides, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--run-config", overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedcl: error: ") and expected in err
    assert len(err.splitlines()) == 1


def test_absent_label_column_is_named(capsys, tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,kind\nhello,a\nworld,b\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["--run-config", "dataset='d.csv' label-column='qtype'"]) == 2
    assert "'label-column' = 'qtype': no such column" in capsys.readouterr().err


def test_no_traceback_from_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", "lora-rank=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert "fedcl: error: config key 'lora-rank' = 0" in done.stderr


def test_flower_environment_finds_the_superlink_without_an_activated_venv(tmp_path, monkeypatch):
    """`flwr run` starts `flower-superlink` by name; CI runs `.venv/bin/python` with a PATH that lacks `.venv/bin`."""
    import shutil
    import sys

    from simulations.run import flower_environment

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = flower_environment(tmp_path)
    found = shutil.which("flower-superlink", path=env["PATH"])
    assert found is not None and Path(found).parent == Path(sys.executable).parent
    assert env["PATH"].endswith("/usr/bin:/bin")


def test_each_run_gets_its_own_superlink_ports(tmp_path):
    """Two runs at once must not share a SuperLink: the first to finish would stop it under the other."""
    import socket

    from simulations.run import flower_environment

    first, second = flower_environment(tmp_path / "a"), flower_environment(tmp_path / "b")
    keys = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
    ports = [int(env[key]) for env in (first, second) for key in keys]
    assert len(set(ports)) == 4 and not {39091, 39093} & set(ports)  # not Flower's shared defaults
    for port in ports:  # free right now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", port))
