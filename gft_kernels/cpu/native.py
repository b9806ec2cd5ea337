"""Placeholder until the native kernel lands."""
def is_available():
    return False
def require():
    raise RuntimeError("native CPU kernel not built")
