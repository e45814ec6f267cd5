"""The outbox: what the server tells systems and people that are not
connected (docs/webhooks.md, docs/notifications.md).

A change writes its outbox record in its own transaction (storage/); the
relay (relay.py) turns each committed record into webhook deliveries and,
for people with no live socket, notifications, and sends them with
retries. Pure parts: records.py (what a record is, its partition, topic
filters), retry.py (the schedule), notices.py (who hears what, in which
words, and when quiet hours hold it)."""
