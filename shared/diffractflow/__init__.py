"""diffractflow: the platform library shared by every service (messages, bus, artifacts, runtime, config)."""
__version__ = "0.1.0"
