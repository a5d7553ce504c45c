"""The study around the method: the driver that executes the notebooks (`driver`, run as
``python -m dpkd_lib.study``), the runs a notebook asks for (`runs`), each run's committed
record (`rundata`), the statistics (`stats`) and the tables, figures and answer (`report`).
Nothing in the core (``dpkd_lib/*.py``) imports this package."""
