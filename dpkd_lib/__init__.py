"""dpkd_lib: the library behind the dpkd-study notebooks (Direct Preference Knowledge
Distillation, arXiv 2406.19774). Every piece of logic lives here; notebooks only call it."""

__version__ = "0.1.0"
