__version__ = "0.1.0"  # the same as pyproject.toml's (tests/unit/test_serving_config.py checks)
