"""Models shipped with dialogpt-edge (package data, so `chat` works right after `pip install`)."""
