"""The only package that reaches into aiohttp, engineio or python-socketio
internals: the direct websocket path, the Socket.IO server, local fan-out and
the Redis manager. README.md lists every hook and why it is there;
tests/transport/test_contract.py checks each against the installed versions."""
