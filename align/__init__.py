"""align: a plugin-based RLHF pipeline.

Importing this package is cheap on purpose (no torch, no transformers): the CLI and plugin discovery
import it before they know whether any training will happen.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

from align.errors import AlignError

try:
    __version__ = version("align")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Marks a function as the implementation of an align hook. A plugin module does
#: ``from align import hookimpl`` and decorates functions named after the specs in
#: :mod:`align.hookspecs`.
hookimpl = pluggy.HookimplMarker("align")

__all__ = ["AlignError", "__version__", "hookimpl"]
