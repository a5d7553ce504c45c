"""dpkd_lib: the library behind the dpkd-study notebooks (Direct Preference Knowledge
Distillation, arXiv 2406.19774). Every piece of logic lives here; notebooks only call it."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes looks for an optional `kernels` package (which would fetch CPU kernels from
# the hub) and warns on every import without it. We leave `kernels` out on purpose.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
