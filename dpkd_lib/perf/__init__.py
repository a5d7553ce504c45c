"""Performance tooling: the benchmarks (`make bench`), the memory planner's calibration
harness and the GPU check (`make gpu-check`). These modules import the library; nothing in
the library imports them."""
