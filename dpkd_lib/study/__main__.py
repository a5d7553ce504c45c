"""python -m dpkd_lib.study: the study driver (driver.main)."""
from .driver import main

if __name__ == "__main__":
    raise SystemExit(main())
