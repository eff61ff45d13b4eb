"""Files: the content-addressed WAV cache, the presets folders, prompt .npz files, WAV encoding."""
