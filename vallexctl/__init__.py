"""vallexctl: the command-line client for vallexd."""
