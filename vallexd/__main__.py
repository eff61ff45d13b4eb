"""`vallexd` console script: parse the configuration, run the daemon, map failures to exit codes.

Exit codes: 0 clean shutdown, 2 bad configuration (or usage), 1 any other startup
failure (model load, socket in use, static server port taken, ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    # Imports stay inside main so `vallexd --help` and config errors answer quickly.
    from vallexd.config import load_config
    from vallexd.errors import VallexError
    from vallexd.server.daemon import Daemon, StartupError, setup_logging

    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except VallexError as exc:
        print(f"vallexd: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    from vallexd.config.options import unknown_environment

    for warning in unknown_environment():
        logging.getLogger("vallexd").warning("%s", warning)
    daemon = Daemon(config)
    try:
        code = asyncio.run(daemon.run())
        if daemon.load_abandoned:  # stopped while the model thread was loading: do not wait for it
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
        return code
    except StartupError as exc:
        logging.shutdown()
        print(f"vallexd: {exc}", file=sys.stderr, flush=True)
        # Exit now: a background thread (e.g. the text front end warming up) cannot be
        # interrupted, and a start that failed must not linger for it. Everything that
        # needed cleaning (child process, socket, lock) was undone by Daemon.run.
        os._exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
