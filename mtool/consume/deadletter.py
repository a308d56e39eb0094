"""Dead letters (the original key, value and headers, plus headers that say why and where from)
and the brake that stops the consumer when too many events in a row are invalid."""

from __future__ import annotations

from collections import deque

ERROR_HEADER = "mtool.error"
TOPIC_HEADER = "mtool.source.topic"
PARTITION_HEADER = "mtool.source.partition"
OFFSET_HEADER = "mtool.source.offset"
MAX_ERROR_BYTES = 1000


def headers(message, error: str) -> list:
    """The message's own headers, then ours (an error is cut to MAX_ERROR_BYTES)."""
    own = list(message.headers() or [])
    return own + [(ERROR_HEADER, error.encode("utf-8")[:MAX_ERROR_BYTES]),
                  (TOPIC_HEADER, message.topic().encode()),
                  (PARTITION_HEADER, str(message.partition()).encode()),
                  (OFFSET_HEADER, str(message.offset()).encode())]


class Brake:
    """Stops the consumer when the share of invalid events among the last `window` events
    passes `limit` (a bad producer deploy would otherwise dead-letter a whole topic). It judges
    only once `window` events were seen."""

    def __init__(self, limit: float, window: int):
        self.limit, self.window = limit, window
        self.recent: deque = deque(maxlen=window)

    def record(self, invalid: bool) -> str | None:
        """None, or the reason to stop."""
        self.recent.append(invalid)
        if len(self.recent) < self.window:
            return None
        share = sum(self.recent) / len(self.recent)
        if share > self.limit:
            return (f"{sum(self.recent)} of the last {len(self.recent)} events were invalid ({share:.0%}), more than "
                    f"the brake's limit of {self.limit:.0%} (--brake-share); stopped before dead-lettering more")
        return None
