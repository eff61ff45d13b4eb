"""vallexd: a local speech-synthesis daemon for the VALL-E X zero-shot TTS model."""

__version__ = "0.1.0"
