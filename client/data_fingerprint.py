"""The records a site's state directory belongs to: a digest checked at every message.

The run config (sent by the server) still decides which file and which
split a simulated site reads. Without this check, a server could start a
new run on the same state directory with another seed or test fraction,
turn records the ledger already counts as training records into "test"
records, and read noise-free evaluation figures on them; a replay buffer's
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
            "this site's training or test records differ from those its state directory was used with: the run "
            "config chose another dataset or split (dataset, seed, test-fraction, partition, num-sites, "
            "max-train-examples, max-test-examples, max-length, model); run with the earlier settings, or, for "
            "records that are really new, start a new state-dir"
        )
