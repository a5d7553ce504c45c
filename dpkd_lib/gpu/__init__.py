"""GPU tools: the memory planner (memory), full-size stand-ins (standins), its calibration (calibrate) and the GPU check (gpu_check)."""
