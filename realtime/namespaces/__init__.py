"""One module per Socket.IO namespace: parse the payload (pydantic), authorize,
call a domain service, reply, emit."""
