"""Audio formats: encoding the canonical float/WAV audio into what clients ask for (torch-free)."""
