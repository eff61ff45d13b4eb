"""vallexctl's command groups; `vallexctl.cli` adds each module's commands to the top-level group."""
