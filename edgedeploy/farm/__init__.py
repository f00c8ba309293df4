"""The device farm: many phones in parallel with leases and retries, one matrix report (``edgedeploy farm``).

``inventory`` reads ``farm.toml``; ``leases`` keeps two farm runs off one device at a time;
``scheduler.run`` profiles every (model, device) pair with retries on peers; ``report`` renders the
matrix; ``status`` lists devices, leases and health and cleans what cut jobs left; ``commands`` is what
the ``farm`` subcommands of :mod:`edgedeploy.cli` call.
"""
