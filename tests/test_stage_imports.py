"""The ClientApp imports no torch until a train or evaluate message needs it.

In deployment Flower starts a fresh ClientApp process for every message; the
three secure-aggregation stages read only policy, run config and protocol
state, so importing ``client.app`` and answering a stage must not import
torch, transformers, peft, opacus or avalanche (seconds per message). Each
check runs in a fresh interpreter: this test process has long imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "opacus", "avalanche")

IMPORT_ONLY = """
import json, sys
import client.app
print(json.dumps({"file": client.app.__file__, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""

KEYS_STAGE = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app
from fedcl.protocol import CONFIG_RECORD, SECAGG_KEYS, SECAGG_RECORD, SITE_RECORD

# Flower sets the run and node identity in its own processes; messages need one.
TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
state_dir = sys.argv[1]
context = Context(
    run_id=1,
    node_id=7,
    node_config={"site-name": "hospital-a", "state-dir": state_dir},
    state=RecordDict(),
    run_config={"num-sites": 3, "recipe": "ncm", "secure-aggregation": True, "dp": True},
)
message = Message(
    content=RecordDict({CONFIG_RECORD: ConfigRecord({"server-round": 1}), SECAGG_RECORD: ConfigRecord()}),
    dst_node_id=7,
    message_type=f"{MessageType.TRAIN}.{SECAGG_KEYS}",
)
reply = client.app.secagg_keys(message, context)
print(json.dumps({
    "file": client.app.__file__,
    "site": dict(reply.content.config_records[SITE_RECORD]),
    "answer": sorted(dict(reply.content.config_records.get(SECAGG_RECORD, ConfigRecord()))),
    "heavy": [m for m in HEAVY if m in sys.modules],
}))
"""


def run_fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root (so this checkout is imported); its JSON line."""
    env = {key: value for key, value in os.environ.items() if key != "FEDCL_SIMULATION_SITES"}
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{code}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve() == ROOT / "client" / "app.py"  # this checkout, not another installed one
    return out


def test_importing_the_client_app_imports_no_torch():
    assert run_fresh(IMPORT_ONLY)["heavy"] == []


def test_a_secure_key_stage_is_answered_without_importing_torch(tmp_path):
    out = run_fresh(KEYS_STAGE, str(tmp_path / "state"))
    assert out["site"] == {"site": "hospital-a", "status": "answered", "reason": ""}
    assert {"enc-public-key", "mask-public-key"} <= set(out["answer"])  # the public keys it advertises
    assert out["heavy"] == []
    assert any((tmp_path / "state").rglob("*.state"))  # its protocol state for the round, kept for stage 2
