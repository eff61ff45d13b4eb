"""Voices from recordings: decode an upload, check it, transcribe it if needed, make a prompt.

Torch-free at import (the client and the server import it); the EnCodec and Whisper models are
loaded lazily by `vallexd.voices.maker` through `vallexd.inference`.
"""
