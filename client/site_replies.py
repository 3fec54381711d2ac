"""What every ClientApp reply carries about its site, and the refusals a site sends: no torch here.

Both the training handlers (``client/site_handlers.py``) and the secure
aggregation stages (``client/app.py``) build their replies from these; the
stages must import no torch (a fresh process per message in deployment), so
this module imports only Flower's records and the site's error types.
"""

from __future__ import annotations

import traceback
from logging import ERROR

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from client.site_data import SiteDataError
from fedcl.protocol import REASON, SITE_NAME, SITE_RECORD, STATUS

INTERNAL_ERROR = "internal error at the site; its operator has the details in the site's log"
DATA_ERROR = (
    "the site's records do not fit the federation (a label or group outside the run config's set, a missing "
    "column, an empty file, a file that is not UTF-8 or not a readable CSV); nothing was trained or spent; its "
    "operator has the details in the site's log"
)


def site_record(site: str, status: str, reason: str = "") -> ConfigRecord:
    """The reply's site record: the site's name, its status ("trained", "refused", ...) and the public reason."""
    return ConfigRecord({SITE_NAME: site, STATUS: status, REASON: reason})


def site_name(context: Context) -> str:
    """The site's name from its node config, or its node id when it has none (a reply must name its sender)."""
    return str(context.node_config.get("site-name", "") or f"node-{context.node_id}")


def internal_failure(msg: Message, context: Context, what: str) -> Message:
    """The reply of a site whose preparation raised an unexpected error: a fixed reason; the traceback stays here.

    An exception's text may carry values read from the site's files (Flower
    would send it whole in an error reply), so none of it leaves the site.
    """
    site = site_name(context)
    log(ERROR, "%s: the %s failed before it started:\n%s", site, what, traceback.format_exc())
    return Message(content=RecordDict({SITE_RECORD: site_record(site, "refused", INTERNAL_ERROR)}), reply_to=msg)


def refusal(msg: Message, context: Context, err: Exception) -> Message:
    """The reply of a site that cannot take part: its data do not fit (details only in its log), or its settings."""
    site = site_name(context)
    log(ERROR, "%s: %s", site, err)
    # A data error's text names records and labels: it stays on site. Other config errors come from settings.
    reason = DATA_ERROR if isinstance(err, SiteDataError) else str(err)
    return Message(content=RecordDict({SITE_RECORD: site_record(site, "refused", reason)}), reply_to=msg)
