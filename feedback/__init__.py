"""Feedback as work (tickets with a status, an assignee, an SLA, replies),
its analysis (counts, response times, top terms), and the ratings that
accumulate per technician (docs/feedback.md)."""
