"""edgedeploy: does this FP16/FP32 model really run on a 12 GB phone, and how fast?

Data flows one way: checkpoint -> estimate -> bundle (compile) -> device run (runtime, devices,
profile) -> report.
"""

__version__ = "0.1.0"
