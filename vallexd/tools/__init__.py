"""Developer tools: tiny random weights in the real formats, and the conformance check."""
