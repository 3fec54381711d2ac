"""The records a site's state directory belongs to: a digest checked at every message.

The site's node config names its files and its train/test split (a seeded
hold-out that no run config changes). Without this check, an operator's
change of files or split on a used state directory could turn records the
ledger already counts as training records into "test" records, whose
noise-free evaluation figures then leave the site; a replay buffer's
stored positions would also point at other records. So the first message a
site answers stores a SHA-256 of its tokenised training and test records
(``data.fingerprint`` in its state directory), and every later message
must see the same records, or it is refused. A site whose records really
changed (new data) starts a new state directory, which its operator decides.
"""

from __future__ import annotations

import hashlib
import json

from client.site_runtime import SiteRuntime
from client.site_state import SiteState
from fedcl.atomic_files import write_json_atomic
from fedcl.run_config import ConfigError

_FORMAT = "fedcl-data-fingerprint"


def data_digest(runtime: SiteRuntime) -> str:
    """SHA-256 of the site's tokenised train and test records, their labels and the label names, in order."""
    digest = hashlib.sha256()
    for split in (runtime.data.train, runtime.data.test):
        for name in sorted(split.inputs):
            digest.update(name.encode())
            digest.update(split.inputs[name].contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    digest.update(json.dumps(list(runtime.data.label_names)).encode())
    return digest.hexdigest()


def check_data_fingerprint(state: SiteState, runtime: SiteRuntime) -> None:
    """Store the digest on first use; afterwards raise :class:`ConfigError` if the site's records differ."""
    digest = data_digest(runtime)
    path = state.data_fingerprint
    if not path.exists():
        write_json_atomic(path, {"format": _FORMAT, "sha256": digest})
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); restore the state directory from its backup") from err
    if stored != digest:
        raise ConfigError(
            "this site's training or test records differ from those its state directory was used with (its "
            "data-path, test-path, test-fraction, split-seed or columns, or the run's labels, max-length or "
            "model changed); use the earlier files and settings, or, for records that are really new, start a "
            "new state-dir"
        )
