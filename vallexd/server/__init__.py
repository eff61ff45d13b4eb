"""The asyncio process: lifecycle, transports (Unix socket, HTTP), the static child. Never imports torch."""
