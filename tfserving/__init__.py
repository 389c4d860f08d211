"""LOCAL STAND-IN for tensorflow_model_server (see standin.py); production uses the real server."""
