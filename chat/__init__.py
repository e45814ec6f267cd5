"""Chat domain: conversations, messages, agent routing and queue, read state,
masking of contact details. Plain async Python: never imports the transport."""
